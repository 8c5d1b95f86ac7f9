"""Stable Diffusion over the views: ``core`` (dream, walk, loop and their records) and ``cli``
(``mimetic dream``, ``walk`` and ``loop``)."""
