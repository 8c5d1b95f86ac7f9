"""Stable Diffusion over the views: ``params``, ``dream``, ``walk`` and ``loop`` (the operations and their records), ``core`` (what they share) and ``cli``
(``mimetic dream``, ``walk`` and ``loop``)."""
