from mlem_jax.diffusion.family import load_family, demo_family_path
from mlem_jax.diffusion.equal_error import level_seconds
fam = load_family(demo_family_path())
for b in (16, 32, 64, 128, 256):
    s = level_seconds(fam.denoisers(), tuple(fam.image_shape), b, repeats=5)
    print(b, s, s[1] / s[0], flush=True)
