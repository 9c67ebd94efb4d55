"""The lecture, "makemore Part 4: Becoming a Backprop Ninja", in JAX.

- :mod:`~jaxninja.lecture.data`: names.txt -> words -> vocabulary -> the lecture's splits.
- :mod:`~jaxninja.lecture.model`: ``init_params(key) -> params``; the forward pass and loss.
- :mod:`~jaxninja.lecture.ninja`: the exercises: the atomized forward pass and its hand-written
  backward pass, the fused rules, ``manual_grads`` (the whole network, no autodiff).
- :mod:`~jaxninja.lecture.check`: the lecture's gradient-check table (``jaxninja check``).
- :mod:`~jaxninja.lecture.sample`: names from a trained model.
"""
