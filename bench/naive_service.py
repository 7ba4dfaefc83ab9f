"""The baseline `bench/serve.py` compares against: a BentoML service written the way the seed
snippets do it. torch eager, torchvision transforms, one image per call, no batching, fp32.

    CNNLOOP_NAIVE_RUN=RUN_DIR bentoml serve bench.naive_service:NaiveClassifier --port 3001
"""
from __future__ import annotations

import os
from pathlib import Path

import bentoml
from PIL.Image import Image


@bentoml.service(name="naive_classifier", workers=1, traffic={"timeout": 120})
class NaiveClassifier:
    def __init__(self) -> None:
        import torch
        from torchvision import transforms

        from training.run.files import load_run

        run = load_run(Path(os.environ["CNNLOOP_NAIVE_RUN"]))
        self.torch = torch
        self.model = run.model.eval()
        self.classes = run.classes
        # The classifier normalises inside its forward, so ToTensor's [0, 1] is its input.
        self.transform = transforms.Compose([
            transforms.Resize(run.policy.resize_size),
            transforms.CenterCrop(run.policy.crop_size),
            transforms.ToTensor(),
        ])

    @bentoml.api
    def predict(self, image: Image) -> dict:
        x = self.transform(image.convert("RGB")).unsqueeze(0)
        with self.torch.no_grad():
            probs = self.torch.softmax(self.model(x), dim=1)[0]
        i = int(probs.argmax())
        return {"label": self.classes[i], "confidence": float(probs[i])}
