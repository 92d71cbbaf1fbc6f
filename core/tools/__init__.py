"""The work behind the ``fedkube`` commands other than ``run``: ``compare``
(is federation worth it, and with which strategy), ``export`` (a LoRA job's
merged model), and the README's generated manifest and strategy reference.
"""
