"""The world's image tokenizer: a patch-local encoder and the nearest-code lookup beside the Janus VQ.

`safecb world train` trains it with the codebook and decoder; evaluation and tests tokenize renders
with it (`encode_tokens`) to see which codes a harm lands on. The loop itself only decodes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


class PatchEncoder(torch.nn.Module):
    """The world's image tokenizer: (B, 3, H, W) in [-1, 1] → latents (B, D, H/4, W/4), where each
    latent sees only its own 4×4 patch.

    Why not the Janus VQ encoder: its mid-block attention and GroupNorm statistics make every latent
    depend on the whole image; adding a weapon glyph changed ~25 of 64 tokens *outside* the glyph
    (measured), so no harm could have codes of its own. The loop only ever decodes (tokens → pixels),
    so the world tokenizes with this local encoder and trains the Janus decoder on its codes; the
    Janus `vqmodel.encoder` in the shipped folder is left untrained and unused.
    """

    def __init__(self, dim: int = 8, width: int = 128, patch: int = 4):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, patch, stride=patch), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, dim, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


def save_patch_encoder(encoder: PatchEncoder, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}, str(path))


def load_patch_encoder(path: Path | str | None = None) -> PatchEncoder:
    """The shipped tokenizer (default) or one from a `train_world` output folder / file."""
    from safetensors.torch import load_file

    from safecb.world import WEIGHTS_DIR

    path = Path(path) if path is not None else WEIGHTS_DIR
    if path.is_dir():
        path = path / "encoder.safetensors"
    state = load_file(str(path))
    width, dim = state["net.0.weight"].shape[0], state["net.4.weight"].shape[0]
    encoder = PatchEncoder(dim=dim, width=width)
    encoder.load_state_dict(state)
    return encoder.eval()


def patch_latents(encoder: PatchEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B*h*w, D) of pixels (B, 3, H, W) in [-1, 1]."""
    h = encoder(pixels)  # (B, D, h, w)
    return F.normalize(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), dim=-1)


@torch.no_grad()
def encode_tokens(model, encoder: PatchEncoder, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Image tokens (N, h*w) of images (N, 3, H, W) uint8 (or float in [0, 1]), by the normalised
    nearest code of each patch's latent."""
    vq = model.model.vqmodel
    device = vq.quantize.embedding.weight.device
    codes = F.normalize(vq.quantize.embedding.weight, dim=-1)
    encoder = encoder.to(device)
    out = []
    for start in range(0, len(images), batch):
        x = images[start:start + batch].to(device)
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float() * 2 - 1
        z = patch_latents(encoder, x)
        out.append((z @ codes.T).argmax(dim=-1).view(x.shape[0], -1))
    return torch.cat(out)


@torch.no_grad()
def decode_tokens(model, tokens: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Images (N, 3, H, W) uint8 from tokens (N, h*w), decoded as the adapter decodes."""
    vq = model.model.vqmodel
    side = vq.quantize.quant_state_dims
    codes = F.normalize(vq.quantize.embedding.weight, dim=-1)
    out = []
    for start in range(0, len(tokens), batch):
        t = tokens[start:start + batch].to(codes.device)
        grid = codes[t].view(t.shape[0], side[0], side[1], -1).permute(0, 3, 1, 2)
        pixels = ((vq.decoder(vq.post_quant_conv(grid)) + 1) / 2).clamp(0, 1)
        out.append((pixels * 255).round().to(torch.uint8))
    return torch.cat(out)
