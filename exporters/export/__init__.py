"""The torch half of exporters/: torch -> ONNX with its parity check, fp16/int8 variants, writing a bundle, timing graphs.
Only training and `cnnloop export` load it; the serving image never imports anything here (tests/test_layout.py)."""
