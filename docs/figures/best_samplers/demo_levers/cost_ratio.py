from mlem_jax.compare import level_seconds
from mlem_jax.diffusion.family import demo_family_path, load_family

fam = load_family(demo_family_path())
for b in (16, 32, 64, 128, 256):
    s = level_seconds(fam.denoisers(), tuple(fam.image_shape), b, repeats=5)
    print(b, s, s[1] / s[0], flush=True)
