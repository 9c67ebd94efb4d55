"""The lecture, "makemore Part 4: Becoming a Backprop Ninja", in JAX.

- ``jaxninja.lecture.data``: names.txt -> words -> vocabulary -> the lecture's splits.
- ``jaxninja.lecture.model``: ``init_params(key) -> params``; the forward pass and loss.
- ``jaxninja.lecture.ninja``: the exercises: the atomized forward pass and its hand-written
  backward pass, the fused rules, ``manual_grads`` (the whole network, no autodiff).
- ``jaxninja.lecture.check``: the lecture's gradient-check table (``jaxninja check``).
- ``jaxninja.lecture.sample``: names from a trained model.
"""
