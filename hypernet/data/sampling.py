"""Batches: global batches of images of one size, in an order that depends only on the seed and the epoch, and
their samples assembled in DataLoader workers from the record store."""

import math

import numpy as np
import torch

from .geometry import alpha_channel, alpha_weight, pixel_values, placed_pixels, to_rgb
from .settings import sample_key
from .sources import changing_prompt, decode_image


class EpochBatchSampler(torch.utils.data.Sampler):
    """Full global batches of images of one size and one context length, in an order that depends only on the seed
    and the epoch; each item is (epoch, index), so batch assembly needs no other state.

    accelerate splits each global batch across the processes, so the data seen at each step is the same for any
    number of processes, and a resumed run skips exactly the batches it already trained on.
    """

    def __init__(self, sizes, batch_size, seed, chunks=None):
        keys = np.asarray(sizes).reshape(len(sizes), -1)
        if chunks is not None:
            keys = np.concatenate([keys, np.asarray(chunks).reshape(-1, 1)], axis=1)
        groups, inverse = np.unique(keys, axis=0, return_inverse=True)
        order = np.argsort(inverse.reshape(-1), kind="stable")
        bounds = np.searchsorted(inverse.reshape(-1)[order], np.arange(len(groups) + 1))
        self.groups = [order[bounds[g] : bounds[g + 1]].astype(np.int64) for g in range(len(groups))]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.drop_last = False

    def set_epoch(self, epoch):
        self.epoch = epoch

    def batches(self):
        generator = torch.Generator().manual_seed(sample_key(self.seed, 2, self.epoch))
        batches = []
        for members in self.groups:
            order = [int(members[i]) for i in torch.randperm(len(members), generator=generator).tolist()]
            while len(order) % self.batch_size:  # fill the last batch from the same group
                order.append(int(members[int(torch.randint(0, len(members), (1,), generator=generator))]))
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [[(self.epoch, i) for i in batches[b]] for b in torch.randperm(len(batches), generator=generator)]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self):
        return sum(math.ceil(len(m) / self.batch_size) for m in self.groups)


class TrainingSamples(torch.utils.data.Dataset):
    """Batches built from the records, in DataLoader workers: latents sampled from the stored mean and std, flips,
    loss weights, fixed prompts' embeddings, changing prompts from their templates with tags shuffled and dropped.
    Every random draw comes from a generator keyed by (seed, epoch, index), so the batches are the same for any
    number of workers. With entries (training without a store), the images' cropped pixels instead of latents."""

    def __init__(self, records, template, settings, entries=None):
        self.records, self.template, self.settings, self.entries = records, template, settings, entries

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        return self.__getitems__([key])

    def __getitems__(self, keys):
        settings, records = self.settings, self.records
        latents, pixels, noises, weights, prompts, embeddings, pooled, time_ids = [], [], [], [], [], [], [], []
        chunks = {int(records.rows[index]["chunks"]) for _, index in keys}
        for epoch, index in keys:
            generator = torch.Generator().manual_seed(sample_key(settings.seed, 3, epoch, index))
            flip = settings.random_flip and bool(torch.rand(1, generator=generator) < 0.5)
            if self.entries is None:
                latents.append(self.latent(epoch, index, flip, generator))
                weight = records.weight(index)
            else:
                image, weight = self.pixels(index)
                pixels.append(image.flip(-1) if flip else image)
                noises.append(self.noise(index, generator))
            if weight is not None:
                weights.append(weight.flip(-1) if flip else weight)
            geometry = records.geometry(index)
            top, left = geometry["flipped_crop_top_left" if flip else "crop_top_left"]
            time_ids.append(torch.tensor([*geometry["original_size"][::-1], top, left, *geometry["size"][::-1]]))
            found = records.embedding(index) if self.entries is None else None
            if found is not None:
                embeddings.append(found[0])
                if found[1] is not None:
                    pooled.append(found[1])
            elif int(records.rows[index]["prompt"]) >= 0:
                prompts.append(records.prompt(index))
            else:
                prompts.append(changing_prompt(self.template, records.captions[index], settings, epoch, index))
        batch = {
            "keys": list(keys),
            "weight": torch.stack(weights) if weights else None,
            "time_ids": torch.stack(time_ids),
            "chunks": max(chunks),
        }
        if latents:
            batch["latents"] = torch.stack(latents)
        else:
            batch["pixels"], batch["latent_noise"] = torch.stack(pixels), torch.stack(noises)
        if embeddings:
            batch["encoder_hidden_states"] = torch.stack(embeddings)
            batch["pooled_embeddings"] = torch.stack(pooled) if pooled else None
        else:
            batch["prompts"] = prompts
        return batch

    def latent(self, epoch, index, flip, generator):
        """The latent an image trains on at this use: the mean of its (or its mirror's) latent distribution plus
        its standard deviation times noise(): the mean itself ('deterministic'), a draw fixed for the image
        ('once'), or a new draw at every use ('random')."""
        means, stds = self.records.latents(index)
        mean, std = (means[-1], stds[-1]) if flip else (means[0], stds[0])
        if self.settings.latent_sampling_method == "deterministic":
            return mean
        return mean + std * self.noise(index, generator)

    def noise(self, index, generator):
        shape = tuple(int(n) for n in self.records.rows[index]["shape"][1:])
        method = self.settings.latent_sampling_method
        if method == "random":
            return torch.randn(shape, generator=generator)
        if method == "once":
            return torch.randn(
                shape, generator=torch.Generator().manual_seed(sample_key(self.settings.seed, 6, index))
            )
        return torch.zeros(shape)

    def pixels(self, index):
        """(pixels, loss weight or None) of image `index`, placed as its record says, for encoding at every step."""
        placement = self.records.placement(index)
        entry = self.entries.entry(index)
        image = decode_image(entry.read(), entry.label)
        shape = tuple(int(n) for n in self.records.rows[index]["shape"][1:])
        weight = alpha_weight(alpha_channel(image), placement, shape) if self.settings.use_weight else None
        return pixel_values([placed_pixels(to_rgb(image), placement)])[0], weight


def collate(batch):
    return batch
