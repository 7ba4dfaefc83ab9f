"""`cnnloop demo`: the whole loop on scikit-learn's handwritten digits, in a few minutes on a CPU.

`loop.run_demo` drives it; `traffic` is its client side, `service_process` the `cnnloop serve` child it
talks to. Nothing is imported here: the service tests use `service_process` without loading torch.
"""
