"""Training data: the webui's dataset semantics, kohya's buckets, and the record store training reads.

- `sources`: images and captions from a folder in the webui's layout or a `datasets` dataset; prompt templates.
- `geometry`: what size each image trains at and which pixels the VAE encodes (stretch, crop, buckets, varsize);
  the loss weight from its alpha channel.
- `store`: latents and text embeddings encoded once into a store on disk, and the index every process maps.
- `sampling`: global batches of one size, and their samples assembled in DataLoader workers.
- `debug`: what training is fed, written out as files (--debug_dataset).
"""

from .debug import write_debug_dataset
from .geometry import (
    Placement,
    alpha_channel,
    alpha_weight,
    bucket_resolutions,
    pixel_values,
    place,
    placed_pixels,
    select_bucket,
    to_rgb,
)
from .sampling import EpochBatchSampler, TrainingSamples, collate
from .settings import IMAGE_FITS, LATENT_SAMPLING_METHODS, DataSettings, sample_key
from .sources import (
    CHUNK,
    IMAGE_EXTENSIONS,
    Entries,
    Entry,
    StreamedEntries,
    caption_from_name,
    check_images,
    dataset_entries,
    decode_image,
    folder_entries,
    image_header,
    load_template,
    make_prompt,
    read_caption,
    read_text,
)
from .store import (
    Encoders,
    Preparation,
    Record,
    Records,
    RecordStore,
    default_store_dir,
    latent_shape,
    prepare_records,
    read_texts,
    write_texts,
)

__all__ = [
    "CHUNK",
    "IMAGE_EXTENSIONS",
    "IMAGE_FITS",
    "LATENT_SAMPLING_METHODS",
    "DataSettings",
    "Encoders",
    "Entries",
    "Entry",
    "EpochBatchSampler",
    "Placement",
    "Preparation",
    "Record",
    "RecordStore",
    "Records",
    "StreamedEntries",
    "TrainingSamples",
    "alpha_channel",
    "alpha_weight",
    "bucket_resolutions",
    "caption_from_name",
    "check_images",
    "collate",
    "dataset_entries",
    "decode_image",
    "default_store_dir",
    "folder_entries",
    "image_header",
    "load_template",
    "latent_shape",
    "make_prompt",
    "pixel_values",
    "place",
    "placed_pixels",
    "prepare_records",
    "read_caption",
    "read_text",
    "read_texts",
    "sample_key",
    "select_bucket",
    "to_rgb",
    "write_debug_dataset",
    "write_texts",
]
