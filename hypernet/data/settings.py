"""How images become training samples: the webui's dataset options under its names, kohya's bucket options under
theirs, and the keys every random draw of the data is seeded from."""

from dataclasses import dataclass

LATENT_SAMPLING_METHODS = ("once", "deterministic", "random")
IMAGE_FITS = ("stretch", "crop", "bucket")


@dataclass(frozen=True)
class DataSettings:
    """resolution is the training size: one side (square) or (width, height). image_fit: "stretch" resizes every
    image to that size, as the webui does; "crop" scales its short side to fit and cuts the rest (random, or centred
    with center_crop); "bucket" resizes it to the aspect-ratio bucket of its proportions, as kohya's scripts do.
    varsize trains each image at its own size, as the webui's option of that name."""

    name: str  # [name] in templates
    resolution: int | tuple = 512
    image_fit: str = "stretch"
    center_crop: bool = False
    random_flip: bool = False
    varsize: bool = False
    use_weight: bool = False
    latent_sampling_method: str = "once"
    shuffle_tags: bool = False
    tag_drop_out: float = 0.0
    seed: int = 0
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    @property
    def size(self):
        """The training size, (width, height)."""
        return (self.resolution, self.resolution) if isinstance(self.resolution, int) else tuple(self.resolution)

    @property
    def fixed_prompts(self):
        """Whether every image's prompt is the same at every use, so that its text embedding can be cached."""
        return not (self.shuffle_tags or self.tag_drop_out)


def sample_key(seed, *parts):
    """A seed for one sample's randomness, the same whatever the number of processes or where a run resumed."""
    key = seed
    for part in parts:
        key = (key * 1_000_003 + int(part)) % (1 << 62)
    return key
