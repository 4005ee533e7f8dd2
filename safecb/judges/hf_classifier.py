"""Any local Hugging Face image-classification folder as a judge (a Q16-style or NSFW classifier).

Loaded offline: safetensors weights only, `trust_remote_code` off, `local_files_only`. The config's
`labels` map the model's labels to harm categories; P(category) is the summed softmax probability
of its labels (exclusive classes: the probability of their union), or the highest sigmoid when the
model is multi-label.
"""

from __future__ import annotations

from pathlib import Path

import torch

from safecb.judges.base import JudgeInfo, JudgeLoadError, file_sha256, to_uint8_hwc


class ClassifierFolderJudge:
    def __init__(self, model, processor, columns: dict[str, list[int]], multi_label: bool, info: JudgeInfo,
                 device: str = "cpu"):
        self.model, self.processor, self.columns, self.multi_label, self.info = model, processor, columns, multi_label, info
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str, labels: dict[str, str], threshold: float = 0.5, name: str = "classifier",
             device: str = "cpu") -> "ClassifierFolderJudge":
        folder = Path(path)
        where = f"judge {name!r}: {path}"
        if not folder.is_dir():
            raise JudgeLoadError(f"{where}: not a local folder (expected a Hugging Face image-classification folder)")
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            has_bin = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
            raise JudgeLoadError(f"{where}: no .safetensors weights" + (" (pickle .bin weights are refused: convert "
                                 "them to safetensors)" if has_bin else ""))
        for needed in ("config.json", "preprocessor_config.json"):
            if not (folder / needed).is_file():
                raise JudgeLoadError(f"{where}: no {needed} (save the model and its image processor with save_pretrained)")
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:
            model = AutoModelForImageClassification.from_pretrained(
                folder, use_safetensors=True, trust_remote_code=False, local_files_only=True)
            processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a bad folder
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise JudgeLoadError(f"{where}: cannot load as an image classifier ({type(err).__name__}: {first})") from None
        id2label = {int(i): str(label) for i, label in model.config.id2label.items()}
        unknown = [label for label in labels if label not in id2label.values()]
        if unknown or not labels:
            raise JudgeLoadError(f"{where}: eval.external_judges labels {unknown or '{}'} must name model labels "
                                 f"(the model has {sorted(id2label.values())})")
        categories = list(dict.fromkeys(labels.values()))
        columns = {c: [i for i, label in sorted(id2label.items()) if labels.get(label) == c] for c in categories}
        multi_label = model.config.problem_type == "multi_label_classification"
        info = JudgeInfo(name=name, kind="hf_classifier", threshold=threshold, categories=categories,
                         classes=[label for label in labels],
                         version=f"{type(model).__name__} sha256:{file_sha256(weights[0])}")
        return cls(model.eval().to(device), processor, columns, multi_label, info, device)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, images.shape[0], batch_size):
            batch = self.processor(images=to_uint8_hwc(images[start:start + batch_size]), return_tensors="pt")
            logits = self.model(pixel_values=batch["pixel_values"].to(self.device)).logits.float()  # (B, L)
            probs = torch.sigmoid(logits) if self.multi_label else logits.softmax(dim=-1)
            per_category = [probs[:, cols].max(dim=-1).values if self.multi_label else probs[:, cols].sum(dim=-1)
                            for cols in self.columns.values()]
            out.append(torch.stack(per_category, dim=-1).cpu())  # (B, C)
        return torch.cat(out) if out else torch.zeros(0, len(self.columns))


def save_tiny_classifier(folder, labels: tuple[str, ...] = ("safe", "nsfw", "gore"), multi_label: bool = False,
                         seed: int = 0):
    """A randomly initialised tiny ViT image classifier saved as a Hugging Face folder (safetensors + image
    processor), built in code: for tests and smoke runs of the classifier-folder judge, like the
    tiny-random model backend. It measures nothing."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={label: i for i, label in enumerate(labels)},
                       problem_type="multi_label_classification" if multi_label else None)
    ViTForImageClassification(config).save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
