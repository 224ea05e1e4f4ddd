"""Write a tiny VQ-VAE checkpoint and the ids of it and of the shipped checkpoint, with the code of main at 9f82110."""
import json, sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).parents[2]))
from conftest import fashion_mnist_subset
from lqae_sklearn import load_checkpoint, save_checkpoint
from lqae_sklearn.model import DEFAULT_CHECKPOINT, VQVAE, preset_config

out = Path(__file__).parent
images, _ = fashion_mnist_subset("test")
x = torch.from_numpy(images[:32].astype(np.float32) / 255).unsqueeze(1)
torch.manual_seed(0)
vq = VQVAE(preset_config("small-28-vqvae", encoder_dim=16, encoder_depth=1, encoder_heads=2, decoder_dim=16,
                         decoder_depth=1, decoder_heads=2, patch_size=7, codebook_size=16)).eval()
with torch.no_grad():
    vq.quantizer.codebook.mul_(0.05)  # rows near the encoder outputs' scale, so that several codes are chosen
save_checkpoint(vq, out / "vqvae-tiny")
lqae = load_checkpoint(DEFAULT_CHECKPOINT)
with torch.no_grad():
    ids = {"images": "tests/data/fashion-mnist t10k, first 32", "commit": sys.argv[1],
           "vqvae-tiny": load_checkpoint(out / "vqvae-tiny").encode(x).tolist(),
           "fashion-mnist-small-28": lqae.encode(x).tolist()}
(out / "ids.json").write_text(json.dumps(ids) + "\n")
print({k: len(set(np.ravel(v))) for k, v in ids.items() if k not in ("images", "commit")})
