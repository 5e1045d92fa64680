"""ImageGPT: the public engine. Loads Hugging Face checkpoints, generates with transformers' call forms
(`generate(input_ids=..., max_length=..., do_sample=True, top_k=40)`), and extracts features and likelihoods.

On CUDA the Triton kernels run and each batch bucket's decode step is a captured CUDA graph; elsewhere PyTorch
stand-ins of the same kernels run eagerly (backend="torch"); backend="triton" on a CPU needs
TRITON_INTERPRET=1 (the tests use it).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import operator
import warnings
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import torch

from igpt_fast.backend import capability_major, on_device, triton_interpreter_on
from igpt_fast.checkpoint import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    check_state_dict,
    generation_settings,
    is_legacy_buffer,
    load_checkpoint,
    save_pretrained,
)
from igpt_fast.config import ImageGPTConfig
from igpt_fast.decoder import BATCH_BUCKETS, SUPPORTED_DTYPES, PackedWeights, StaticDecoder, bucket_for
from igpt_fast.philox import generation_key
from igpt_fast.reference import DEFAULT_TOP_K, check_input_ids, resolve_length
from igpt_fast.sampling import as_list, check_sampling_args, sampling_tensors


class _ModelOutputAccess:
    """transformers' ModelOutput access on a dataclass: out.logits, out["logits"], and out[0] (the fields that are
    not None, in order)."""

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.__dataclass_fields__ or getattr(self, key) is None:
                raise KeyError(key)
            return getattr(self, key)
        return tuple(v for v in (getattr(self, f) for f in self.__dataclass_fields__) if v is not None)[key]


@dataclass(kw_only=True)
class CausalLMOutput(_ModelOutputAccess):
    """What model(ids) returns, in transformers' field order: loss only with labels, hidden_states only when
    asked."""

    loss: torch.Tensor | None = None  # float32 scalar: mean next-token cross-entropy over the labels, in nats
    logits: torch.Tensor  # float32 [B, S, n_clusters]
    # (embeddings, block 1 out, ..., block n_layer-1 out, ln_f(block n_layer out)), each [B, S, d] in the model's
    # dtype: transformers' hidden_states
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class GenerateOutput(_ModelOutputAccess):
    """What generate(return_dict_in_generate=True) returns, named as transformers names it."""

    sequences: torch.Tensor  # [B, prefix + new]
    logits: tuple[torch.Tensor, ...] | None = None  # one float32 [B, n_clusters] per generated token


@dataclass
class LogLikelihood:
    nll: torch.Tensor  # [B] mean negative log-likelihood per token, in nats
    bits_per_dim: torch.Tensor  # [B] the same in bits; a dimension is one token (a pixel's color cluster)


IGNORE_INDEX = -100  # labels that the loss skips, as in transformers (torch's cross_entropy default)

# Whole-image forwards (logits, features, likelihood) run this many tokens at a time: 64 images of 1024 pixels,
# enough rows to keep an H100 busy, and at imagegpt-large about 1.6 GB of activations in 16-bit.
FORWARD_CHUNK_TOKENS = 65536
# generate(progress=...) reports every this many decode steps: 32 reports an image. Each waits on a CUDA event of
# the run before the one already queued, so reporting costs the GPU nothing.
PROGRESS_STEPS = 32


def _on_model_device(method):
    """Run a method with the model's CUDA device current (see backend.on_device), and without autograd."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with on_device(self.device), torch.no_grad():
            return method(self, *args, **kwargs)

    return run


class ImageGPT:
    """ImageGPTForCausalImageModeling's fast twin: `.config`, `.generate`, `.to`, `.eval` as in transformers."""

    def __init__(self, config: ImageGPTConfig, state_dict: dict[str, torch.Tensor], *, dtype=None, device=None,
                 backend: str | None = None, use_cuda_graphs: bool = True, max_batch: int = BATCH_BUCKETS[-1]):
        if not isinstance(config, ImageGPTConfig):
            raise TypeError(f"config must be an igpt_fast.ImageGPTConfig, got {type(config).__name__}")
        state_dict = {k: v for k, v in state_dict.items() if not is_legacy_buffer(k)}
        check_state_dict(config, state_dict)
        _check_max_batch(max_batch)
        self.config = config
        self.max_batch = max_batch
        self.use_cuda_graphs = use_cuda_graphs
        self._state_dict = state_dict  # kept (on its own device) so .to() can repack
        self._backend_request = backend
        self._build(torch.device(device) if device is not None else torch.device("cpu"),
                    dtype if dtype is not None else torch.float32)

    def _build(self, device: torch.device, dtype: torch.dtype) -> None:
        backend = _checked_backend(device, dtype, self._backend_request)
        weights = PackedWeights.pack(self.config, self._state_dict, dtype, device)
        self.decoder = StaticDecoder(self.config, weights, backend=backend, use_cuda_graphs=self.use_cuda_graphs)

    # ---- construction, transformers-style ----
    @classmethod
    def from_pretrained(cls, path_or_hub_id, *, dtype=None, device=None, torch_dtype=None, device_map=None,
                        revision: str | None = None, cache_dir=None, local_files_only: bool = False, token=None,
                        **kwargs) -> ImageGPT:
        """From a local Hugging Face folder or a hub id (resolved through the local cache first). As in transformers,
        `torch_dtype` is the older name for `dtype`, a dtype may be named ("float16"; "auto": the dtype config.json
        names, else that of the stored weights), and `device_map` may name the one device the model runs on ("cuda",
        0, {"": "cuda:1"}; "auto": the GPU when there is one). revision, cache_dir, local_files_only and token pick
        a hub id's files as in transformers. Other arguments are the constructor's (backend, ...). Without a dtype
        the model runs in float32 (transformers 5 defaults to "auto")."""
        # Every argument is checked before the weights are read (imagegpt-large's are 1.6 GB).
        options = {name for name, p in inspect.signature(cls.__init__).parameters.items()
                   if p.kind is p.KEYWORD_ONLY} - {"dtype", "device"}
        if set(kwargs) - options:
            raise ValueError(f"from_pretrained() got arguments it does not use: {sorted(set(kwargs) - options)}")
        dtype, torch_dtype = _named_dtype(dtype, "dtype"), _named_dtype(torch_dtype, "torch_dtype")
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one of them")
        dtype = dtype or torch_dtype
        if device_map is not None:
            mapped = _device_of_map(device_map)
            if device is not None and torch.device(device) != mapped:
                raise ValueError(f"device={device} and device_map={device_map!r} disagree; pass one of them")
            device = mapped
        _check_max_batch(kwargs.get("max_batch", BATCH_BUCKETS[-1]))
        _checked_backend(torch.device(device) if device is not None else torch.device("cpu"),
                         None if dtype == "auto" else dtype or torch.float32, kwargs.get("backend"))
        checkpoint = load_checkpoint(path_or_hub_id, revision=revision, cache_dir=cache_dir,
                                     local_files_only=local_files_only, token=token)
        if dtype == "auto":  # transformers' "auto": config.json's dtype, else the stored weights' (openai's: float32)
            saved = json.loads((checkpoint.folder / CONFIG_NAME).read_text(encoding="utf-8"))
            named = saved.get("dtype") or saved.get("torch_dtype")
            dtype = (_named_dtype(named, "config.json's dtype") if named
                     else next(iter(checkpoint.state_dict.values())).dtype)
        _warn_of_generation_defaults(checkpoint.folder)
        return cls(checkpoint.config, checkpoint.state_dict, dtype=dtype, device=device, **kwargs)

    @classmethod
    def from_hf(cls, hf_model, **kwargs) -> ImageGPT:
        """From an in-memory transformers ImageGPTForCausalImageModeling."""
        state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
        return cls(ImageGPTConfig.from_hf(hf_model.config), state, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    @property
    def backend(self) -> str:
        return self.decoder.backend

    def to(self, device=None, dtype=None) -> ImageGPT:
        """Repack the weights on another device and/or dtype; caches and graphs are rebuilt on first use."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if (device is None or torch.device(device) == self.device) and dtype in (None, self.dtype):
            return self  # already there: keep the caches and graphs
        self._build(torch.device(device) if device is not None else self.device, dtype or self.dtype)
        return self

    # nn.Module's shorthands for .to(), which transformers users call on a model
    def cuda(self, device=None) -> ImageGPT:
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def cpu(self) -> ImageGPT:
        return self.to("cpu")

    def half(self) -> ImageGPT:
        return self.to(dtype=torch.float16)

    def bfloat16(self) -> ImageGPT:
        return self.to(dtype=torch.bfloat16)

    def float(self) -> ImageGPT:
        return self.to(dtype=torch.float32)

    def eval(self) -> ImageGPT:
        return self  # inference only: there is no dropout to switch off

    def release_caches(self) -> None:
        """Free every bucket's KV cache and CUDA graphs."""
        self.decoder.release_caches()

    def save_pretrained(self, folder) -> Path:
        """config.json and model.safetensors with the weights in the model's dtype (`.half().save_pretrained(f)`
        halves a checkpoint), in the layout transformers loads. The image processor saves its own
        preprocessor_config.json."""
        return save_pretrained(folder, self.config, {k: v.to(self.dtype) for k, v in self._state_dict.items()})

    # ---- forward, features, likelihood ----
    def _prompt(self, input_ids) -> torch.Tensor:
        ids = torch.as_tensor(input_ids)
        check_input_ids(ids, self.config)
        if ids.shape[1] > self.config.n_positions:
            raise ValueError(f"input_ids has {ids.shape[1]} tokens; the model has n_positions="
                             f"{self.config.n_positions}")
        return ids.to(device=self.device, dtype=torch.int64)

    def _prefill_scratch(self, ids: torch.Tensor, keep_hidden: int | None = None,
                         hidden_states: list | None = None) -> torch.Tensor:
        """Prefill without keeping a cache: every layer reuses one [2, B, H, S, D] scratch buffer."""
        c = self.config
        B, S = ids.shape
        scratch = torch.empty(2, B, c.n_head, S, c.head_dim, device=self.device, dtype=self.dtype)
        return self.decoder.prefill(ids, lambda i: (scratch[0], scratch[1]), keep_hidden=keep_hidden,
                                    hidden_states=hidden_states)

    def _by_chunks(self, ids: torch.Tensor, forward):
        """forward(ids[rows]) over chunks of at most FORWARD_CHUNK_TOKENS tokens, concatenated (element by element
        when forward returns a tuple of tensors): a dataset's batch needs the activations of one chunk at a time
        (imagegpt-large's MLP: 6144 values a token), not of all."""
        rows = max(1, FORWARD_CHUNK_TOKENS // ids.shape[1])
        parts = [forward(ids[start:start + rows]) for start in range(0, ids.shape[0], rows)]
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(same) for same in zip(*parts, strict=True))
        return torch.cat(parts)

    def _labels(self, labels, shape: torch.Size) -> torch.Tensor:
        """labels as transformers' loss reads them: integers shaped like input_ids, each a pixel token or -100
        (ignored) from position 1 on (position 0 is never a target: any value)."""
        labels = torch.as_tensor(labels)
        if labels.shape != shape or labels.dtype.is_floating_point or labels.dtype.is_complex or \
                labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor shaped like input_ids {list(shape)}, got "
                             f"{labels.dtype} {list(labels.shape)}")
        targets = labels[:, 1:]
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= self.config.n_clusters))
        if bad.any():
            raise ValueError(f"labels[:, 1:] must be pixel tokens in [0, {self.config.n_clusters}) or "
                             f"{IGNORE_INDEX} (ignored), got {int(targets[bad][0])}")
        return labels.to(device=self.device, dtype=torch.int64)

    @_on_model_device
    def __call__(self, input_ids, *, labels=None, output_hidden_states: bool = False,
                 return_dict: bool = True) -> CausalLMOutput | tuple:
        """transformers' forward: float32 logits of every position [B, S, n_clusters]; with labels [B, S] the loss
        (cross-entropy of labels[:, 1:] given the logits before them, mean over labels other than -100);
        with output_hidden_states the hidden states; return_dict=False gives the fields that are set as a tuple."""
        _check_bools(output_hidden_states=output_hidden_states, return_dict=return_dict)
        ids = self._prompt(input_ids)
        if labels is not None:
            labels = self._labels(labels, ids.shape)

        def forward(chunk):
            hidden = [] if output_hidden_states else None
            x = self._prefill_scratch(chunk, hidden_states=hidden)
            logits = self.decoder.lm_head(x).view(*chunk.shape, -1)
            if hidden is not None:
                hidden[-1] = self.decoder.final_norm(hidden[-1])
                return logits, *(h.view(*chunk.shape, -1) for h in hidden)
            return logits

        parts = self._by_chunks(ids, forward)
        logits, hidden_states = (parts[0], parts[1:]) if output_hidden_states else (parts, None)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        out = CausalLMOutput(loss=loss, logits=logits, hidden_states=hidden_states)
        return out if return_dict else tuple(out[:])

    forward = __call__

    @_on_model_device
    def features(self, input_ids, *, layer: int | None = None, pool: str | None = "mean") -> torch.Tensor:
        """Linear-probe features: the hidden state after block `layer` (transformers' hidden_states[layer]:
        0 = embeddings, n_layer = the final output after ln_f; default the middle block, where the paper's best
        probes sit), mean-pooled over positions ([B, d]) or not (pool=None: [B, S, d])."""
        n_layer = self.config.n_layer
        if layer is None:
            layer = n_layer // 2
        layer = _check_int(layer, "layer", 0, n_layer + 1, f"an int in [0, {n_layer}]")
        if pool not in ("mean", None):
            raise ValueError(f"pool must be 'mean' or None, got {pool!r}")
        ids = self._prompt(input_ids)

        def features_of(chunk):
            x = self._prefill_scratch(chunk, keep_hidden=layer)
            if layer == n_layer:
                x = self.decoder.final_norm(x)
            x = x.view(*chunk.shape, -1)
            return x.float().mean(dim=1) if pool == "mean" else x

        return self._by_chunks(ids, features_of)

    @_on_model_device
    def log_likelihood(self, input_ids) -> LogLikelihood:
        """Per-image likelihood of pixel tokens [B, L] (no SOS, as the image processor returns them): the SOS
        is prepended and every one of the L tokens is scored given those before it."""
        ids = self._prompt(input_ids)
        if int(ids.max()) >= self.config.n_clusters:
            raise ValueError(f"pixel tokens must lie in [0, {self.config.n_clusters}); the SOS "
                             f"({self.config.sos_token_id}) is prepended here, do not pass it")
        sos = torch.full_like(ids[:, :1], self.config.sos_token_id)

        def nll_of(chunk):
            inputs = torch.cat([sos[:len(chunk)], chunk[:, :-1]], dim=1)
            logits = self.decoder.lm_head(self._prefill_scratch(inputs)).view(*chunk.shape, -1)
            return -torch.log_softmax(logits, dim=-1).gather(-1, chunk[..., None])[..., 0].mean(dim=1)

        nll = self._by_chunks(ids, nll_of)
        return LogLikelihood(nll=nll, bits_per_dim=nll / math.log(2))

    # ---- generation ----
    @_on_model_device
    def generate(self, input_ids=None, *, pixel_values=None, inputs=None, max_length: int | None = None,
                 max_new_tokens: int | None = None, do_sample: bool = False, temperature=1.0, top_k=None,
                 top_p=None, num_return_sequences: int = 1, seed: int | None = None,
                 generator: torch.Generator | None = None, return_dict_in_generate: bool = False,
                 output_logits: bool = False, attention_mask=None, pad_token_id: int | None = None,
                 use_cache: bool = True, progress=None, **unused):
        """transformers' call: ids [B, P] (the SOS column, or SOS + pixels to complete) -> LongTensor
        [B, max_length] on the input's device. `pixel_values=` (the older model card's) and `inputs=` (the name of
        transformers' first parameter) are other names for input_ids.
        max_length defaults to a whole image (n_positions + 1). Sampling: temperature, then top-k (default 50
        like transformers; 0 or more than the colors keeps them all, as there), then top-p; `seed=` or
        `generator=` (else torch's global RNG) picks the stream, and image b of a seed is the same whatever the
        batch it is generated in (and no other seed's: seeds s and s + 1 draw unrelated streams).
        num_return_sequences=n samples n sequences per prompt row, as transformers does: rows b*n .. b*n + n - 1 of
        the output continue row b (per-row sampling values follow their row).
        Arguments transformers code passes to silence its warnings are taken where they change nothing here: an
        all-ones attention_mask (prompts are never padded), pad_token_id (no sequence ends early, so nothing is
        padded) and use_cache (the engine always caches; the tokens are the same).
        progress: called as progress(done, total) with the tokens generated so far of total = rows * new tokens, as
        they finish on the device: after the first token, then every PROGRESS_STEPS steps (for a progress bar;
        None: no reports, and no host sync before the end)."""
        if unused:
            raise ValueError(f"generate() got arguments it does not use: {sorted(unused)}")
        prompts = [p for p in (input_ids, pixel_values, inputs) if p is not None]
        if len(prompts) != 1:
            raise ValueError(f"pass the prompt once, as input_ids (or pixel_values or inputs), got {len(prompts)}")
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        # Checked up front: a string generator would fail later with "'str' object has no attribute 'device'".
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {generator!r}")
        _check_bools(return_dict_in_generate=return_dict_in_generate, output_logits=output_logits,
                     use_cache=use_cache)
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a callable progress(done, total) or None, got {progress!r}")
        if pad_token_id is not None:
            _check_int(pad_token_id, "pad_token_id", -2**63, 2**63, "an int")
        given = prompts[0]
        out_device = given.device if isinstance(given, torch.Tensor) else torch.device("cpu")
        ids = torch.as_tensor(given)
        check_input_ids(ids, self.config)
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask)
            if mask.shape != ids.shape or not bool((mask == 1).all()):
                raise ValueError(f"attention_mask must be all ones, shaped like the prompt {list(ids.shape)} "
                                 f"(igpt-fast does not pad prompts: give rows of one length), got {mask.dtype} "
                                 f"{list(mask.shape)} with {int((mask != 1).sum())} entries other than 1")
        copies = _check_int(num_return_sequences, "num_return_sequences", 1, math.inf, "an int >= 1")
        if copies > 1 and not do_sample:  # transformers refuses it too: greedy copies would all be the same
            raise ValueError(f"num_return_sequences={copies} needs do_sample=True: greedy decoding returns one "
                             f"sequence per prompt")
        batch, prefix = ids.shape
        new_tokens = resolve_length(prefix, _check_length(max_length, "max_length"),
                                    _check_length(max_new_tokens, "max_new_tokens"), self.config)
        vocab = self.config.n_clusters
        if do_sample and top_k is None:
            top_k = min(DEFAULT_TOP_K, vocab)
        top_k = _transformers_top_k(top_k, vocab)
        check_sampling_args(do_sample, temperature, top_k, top_p, vocab)
        temperature, top_k, top_p = (values.repeat_interleave(copies) for values in
                                     sampling_tensors(temperature, top_k, top_p, batch=batch, vocab=vocab))
        ids, batch = ids.repeat_interleave(copies, dim=0), batch * copies
        if seed is not None:
            seed = _check_seed(seed)
        elif not do_sample:  # greedy draws nothing, as in transformers: the global RNG and the generator stay put
            seed = 0
        else:  # drawn on the generator's device: torch refuses a CUDA generator for a CPU draw
            seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                                     device=generator.device if generator is not None else None))
        key = generation_key(seed)  # row b draws with key + b, whatever chunk it falls in

        chunks, step_logits = [], []
        for start in range(0, batch, self.max_batch):
            rows = slice(start, min(start + self.max_batch, batch))
            report = None
            if progress is not None:  # this chunk's rows times its steps done, after the rows before it
                def report(steps, before=start * new_tokens, width=rows.stop - start):
                    progress(before + width * steps, batch * new_tokens)
            chunk = self._generate_chunk(ids[rows], new_tokens, greedy=not do_sample, seed=_wrap_int64(key + start),
                                         params=(temperature[rows], top_k[rows], top_p[rows]),
                                         logits_out=step_logits if output_logits else None, report=report)
            chunks.append(chunk.to(out_device))
        sequences = torch.cat(chunks)
        if not return_dict_in_generate:
            return sequences
        logits = None
        if output_logits:  # appended chunk by chunk, step by step: regroup per step over the whole batch
            logits = tuple(torch.cat(step_logits[i::new_tokens]).to(out_device) for i in range(new_tokens))
        return GenerateOutput(sequences=sequences, logits=logits)

    def _generate_chunk(self, ids: torch.Tensor, new_tokens: int, *, greedy: bool, seed: int, params,
                        logits_out: list | None, report=None) -> torch.Tensor:
        batch, prefix = ids.shape
        bucket = bucket_for(batch, self.max_batch)
        state = self.decoder.state(bucket)
        prompt = ids.to(self.device, torch.int64)
        if batch < bucket:  # pad with copies of the first row; their samples are dropped
            prompt = torch.cat([prompt, prompt[:1].expand(bucket - batch, prefix)])
        for buffer, values in zip((state.temperature, state.top_k, state.top_p), params, strict=True):
            buffer[:batch].copy_(values)
            buffer[batch:].copy_(values[:1].expand(bucket - batch))
        state.seed.fill_(seed)
        self.decoder.start(state, prompt, greedy=greedy)  # samples the first new token
        if logits_out is not None:
            logits_out.append(state.logits[:batch].clone())

        def decode(steps):
            if logits_out is None:
                self.decoder.decode(state, steps, greedy=greedy)
            else:  # every step's logits: one step at a time
                for _ in range(steps):
                    self.decoder.step(state, greedy=greedy)
                    logits_out.append(state.logits[:batch].clone())

        if report is None:
            decode(new_tokens - 1)
        else:
            self._decode_reporting(decode, new_tokens - 1, lambda steps: report(1 + steps))
        # The graph overwrites its buffers on the next call: hand back a copy.
        return state.sequences[:batch, :prefix + new_tokens].clone()

    def _decode_reporting(self, decode, steps: int, report) -> None:
        """decode(steps) in runs of PROGRESS_STEPS, calling report(steps done) once the first token (sampled by
        start) and then each run have finished on the device. The host waits for a run only once the next is
        queued, so the GPU never idles for a report."""
        finished = (self._recorded_event(), 0)
        for done in range(0, steps, PROGRESS_STEPS):
            run = min(PROGRESS_STEPS, steps - done)
            decode(run)
            queued = (self._recorded_event(), done + run)
            _report_when_done(*finished, report)
            finished = queued
        _report_when_done(*finished, report)

    def _recorded_event(self) -> torch.cuda.Event | None:
        """A CUDA event recorded after the work queued so far (None off CUDA, where that work is done)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event


def _report_when_done(event, steps: int, report) -> None:
    if event is not None:
        event.synchronize()
    report(steps)


def _warn_of_generation_defaults(folder: Path) -> None:
    """transformers' generate() takes its defaults from a checkpoint's generation_config.json; this generate() does not
    read it: say so when the file sets any (silently, a file asking for do_sample=True would decode greedily)."""
    settings = generation_settings(folder)
    if settings:
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(settings.items()))
        warnings.warn(f"{folder / GENERATION_CONFIG_NAME} sets {shown}; igpt-fast's generate() does not read "
                      f"generation_config.json: pass these to generate() as arguments", stacklevel=3)


def _check_max_batch(max_batch) -> None:
    if max_batch not in BATCH_BUCKETS:
        raise ValueError(f"max_batch must be one of the batch buckets {BATCH_BUCKETS}, got {max_batch!r}")


def _checked_backend(device: torch.device, dtype: torch.dtype | None, requested: str | None) -> str:
    """The backend a model on `device` in `dtype` runs with (None: not known yet, "auto"), or a ValueError saying
    why that placement cannot run."""
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    backend = requested or ("triton" if device.type == "cuda" else "torch")
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    if backend == "triton" and device.type == "cpu" and not triton_interpreter_on():
        raise ValueError("backend='triton' on the CPU needs TRITON_INTERPRET=1 set before igpt_fast is "
                         "imported (or use backend='torch')")
    if dtype == torch.bfloat16 and backend == "triton" and device.type == "cpu":
        raise ValueError("the Triton interpreter has no bfloat16; use float32/float16 or backend='torch'")
    if dtype == torch.bfloat16 and backend == "triton" and device.type == "cuda" and capability_major(device) < 8:
        raise ValueError(f"bfloat16 kernels need a GPU of compute capability 8.0 or newer (Ampere, Hopper); "
                         f"{device} is {capability_major(device)}.x: use dtype=torch.float16")
    return backend


def _named_dtype(dtype, name: str):
    """None, "auto", or a supported torch dtype, also by name ("float16", "torch.bfloat16") as transformers takes it."""
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    if dtype is None or dtype == "auto" or dtype in SUPPORTED_DTYPES:
        return dtype
    raise ValueError(f"{name} must be one of {SUPPORTED_DTYPES}, their names or 'auto', got {dtype!r}")


def _device_of_map(device_map) -> torch.device:
    """transformers' device_map where it names one device (a model runs on one here): "cpu", "cuda:1", a GPU index,
    {"": device}; "auto" is the GPU when there is one, else the CPU. A map that splits the model is refused."""
    device = device_map[""] if isinstance(device_map, dict) and set(device_map) == {""} else device_map
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        device = torch.device("cuda", device)
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map must name one device ('cuda', 'cpu', a GPU index, {{'': device}} or 'auto'): "
                         f"igpt-fast runs a model on one device; got {device_map!r}") from None


def _transformers_top_k(top_k, vocab: int):
    """top_k as transformers reads it: 0 turns top-k off, and a k above the vocabulary keeps every token (the model
    card's top_k=40 on the 16-color demo model); both are k = vocab here. None and other values (per row too) are
    left to check_sampling_args."""
    if top_k is None:
        return None

    def read(k):
        return vocab if isinstance(k, Integral) and not isinstance(k, bool) and (k == 0 or k > vocab) else k

    return [read(k) for k in as_list(top_k)]


def _check_int(value, name: str, low: float, high: float, expected: str) -> int:
    """value as an int (Python, numpy or a 0-d integer tensor; not a bool) in [low, high), else a ValueError naming
    it, raised before anything runs (a float length used to fail inside the decode loop, after the cache was
    allocated)."""
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            pass
        else:
            if low <= number < high:
                return number
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_bools(**flags) -> None:
    """Flags must be real bools: a string such as "no" would otherwise read as true."""
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")


def _check_length(value, name: str) -> int | None:
    return None if value is None else _check_int(value, name, 1, math.inf, "an int >= 1")


def _check_seed(seed) -> int:  # the kernels read the seed from an int64 tensor
    return _check_int(seed, "seed", -2**63, 2**63, "an int in [-2**63, 2**63)")


def _wrap_int64(value: int) -> int:
    """value as int64 arithmetic leaves it (two's complement): row b of a chunk draws from key + b computed on the
    device in int64, so a chunk starting at row `start` takes key + start wrapped the same way."""
    return (value + 2**63) % 2**64 - 2**63


# transformers' class name, so the model card's import line is the only change.
ImageGPTForCausalImageModeling = ImageGPT
