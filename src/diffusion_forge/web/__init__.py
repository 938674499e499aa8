"""`dforge serve`: a local web page to explore diffusion (schedules, the forward process, generation step by
step, samplers side by side, training runs), built with Gradio.

* ``handlers.py``: the pure functions behind Schedules, Forward process and Runs (no Gradio; tested directly).
* ``generation.py``: loading models once, checking a request, a generation that yields every step and can
  be cancelled, two samplers from the same seeds (no Gradio).
* ``callbacks.py``: thin adapters from the page's values to those functions; every error a one-line message.
* ``app.py``: the Blocks layout, the queue and the server (port check, loopback by default).

Importing this package imports neither Gradio nor torch; ``web.app`` imports Gradio.
"""
