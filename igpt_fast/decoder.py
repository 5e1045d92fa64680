"""The static-shape decoder: weights packed once, one KV cache per batch bucket allocated once, a prefill
pass for prompts, and a decode step that runs entirely in kernels reading the position from device memory,
so one CUDA graph per (bucket, greedy) serves every step.

Per decode step, per layer (5 launches):
    norm_qkv         ln_1 -> c_attn -> bias; q to a buffer, k and v straight into the cache at pos
    decode_attention q against cache[0..pos] (split-K; the last split to finish merges, same launch)
    linear_residual  x += attn @ c_proj + b
    norm_linear      ln_2 -> c_fc -> bias -> quick_gelu (the "layernorm-GELU" kernel)
    linear_residual  x += h @ mlp.c_proj + b
plus embed before the layers and norm_linear (ln_f -> lm_head, float32 logits) and sample_tokens (which also
advances pos, its last program writing pos + 1) after them: nothing but Triton kernels.
On sm_90+ they are launched with programmatic dependent launch (igpt_fast.backend.use_pdl), and the captured graph
keeps those launches' programmatic edges, so each kernel's launch and first weight reads overlap the previous
kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from igpt_fast import backend, torch_ops
from igpt_fast.config import ImageGPTConfig
from igpt_fast.reference import attention_scale

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Linear weights are stored [out, in] (nn.Linear's layout, rows contiguous along the reduction) and handed to the
# kernels as [in, out] views: a decode GEMV program then streams whole rows of W instead of 16-byte pieces of many.
# Measured against row-major [in, out] on an H100 (fp16, graph-timed kernels, 2026-11-27): as fast or faster in
# every linear kernel, 1.3x at batch 1 and 2-3x at batch 8.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Let decode attention read pos and the cached keys before t ahead of its wait on norm_qkv (decode_attention's
# kv_before_wait) in buckets of up to this many rows: pos and the cache rows before t change only between steps (pos
# by the previous step's sampler, which the step's first kernel waits for; earlier rows in earlier steps or the
# prefill), never in the kernel just before attention. On an H200 (fp16, imagegpt-small, 2026-12-04) the decode step
# took 0.262 ms instead of 0.275 at batch 1, but 0.613 instead of 0.547 at batch 8 and 1.187 instead of 1.150 at 64;
# buckets 2 and 4 are not measured (the sweep times them).
ATTENTION_KV_BEFORE_WAIT_MAX_BATCH = 1


def kernel_ops(backend: str):
    """The op set the decoder calls: Triton launchers or the module of their PyTorch stand-ins (same names and
    signatures)."""
    if backend == "torch":
        return torch_ops
    from igpt_fast.kernels import attention, embedding, linear, sampling

    return SimpleNamespace(
        embed=embedding.embed, norm_qkv=linear.norm_qkv, norm_linear=linear.norm_linear,
        linear_residual=linear.linear_residual, prefill_attention=attention.prefill_attention,
        decode_attention=attention.decode_attention, decode_workspace=attention.decode_workspace,
        residual_workspace=linear.residual_workspace,
        sample_tokens=sampling.sample_tokens,
    )


@dataclass
class LayerWeights:
    ln_1: torch.Tensor
    c_attn_w: torch.Tensor  # [d, 3d] (every linear weight: [in, out], laid out by pack_linear)
    c_attn_b: torch.Tensor
    attn_proj_w: torch.Tensor  # [d, d]
    attn_proj_b: torch.Tensor
    ln_2: torch.Tensor
    c_fc_w: torch.Tensor  # [d, inner]
    c_fc_b: torch.Tensor
    mlp_proj_w: torch.Tensor  # [inner, d]
    mlp_proj_b: torch.Tensor
    scale: float  # attention score scale of this layer


@dataclass
class PackedWeights:
    wte: torch.Tensor
    wpe: torch.Tensor
    layers: list[LayerWeights]
    ln_f: torch.Tensor
    lm_head_w: torch.Tensor  # [d, n_clusters]: nn.Linear's [out, in] seen as [in, out] like the others

    @classmethod
    def pack(cls, config: ImageGPTConfig, state: dict[str, torch.Tensor], dtype, device) -> PackedWeights:
        def get(name):
            return state[name].detach().to(device=device, dtype=dtype).contiguous()

        def get_linear(name):  # Conv1D weights are [in, out]
            return pack_linear(state[name].detach().to(device=device, dtype=dtype))

        layers = []
        for i in range(config.n_layer):
            p = f"transformer.h.{i}."
            layers.append(LayerWeights(
                get(p + "ln_1.weight"), get_linear(p + "attn.c_attn.weight"), get(p + "attn.c_attn.bias"),
                get_linear(p + "attn.c_proj.weight"), get(p + "attn.c_proj.bias"), get(p + "ln_2.weight"),
                get_linear(p + "mlp.c_fc.weight"), get(p + "mlp.c_fc.bias"), get_linear(p + "mlp.c_proj.weight"),
                get(p + "mlp.c_proj.bias"), attention_scale(config, i),
            ))
        lm_head_w = pack_linear(state["lm_head.weight"].detach().to(device=device, dtype=dtype).t())
        return cls(get("transformer.wte.weight"), get("transformer.wpe.weight"), layers,
                   get("transformer.ln_f.weight"), lm_head_w)


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight [in, out] (any strides) as the kernels get it: a view of a row-major [out, in] copy."""
    return weight.t().contiguous().t()


@dataclass
class BucketState:
    """Everything one batch bucket's decode step reads and writes, allocated once."""

    batch: int
    kv_cache: torch.Tensor  # [n_layer, 2, batch, n_head, n_positions, head_dim]
    x: torch.Tensor  # [batch, d] residual stream
    q: torch.Tensor  # [batch, d]
    attn: torch.Tensor  # [batch, d]
    hidden: torch.Tensor  # [batch, inner]
    logits: torch.Tensor  # [batch, n_clusters] float32
    ids: torch.Tensor  # [batch] int64: the token fed in at pos
    sequences: torch.Tensor  # [batch, n_positions + 1] int64: every token of every sequence
    pos: torch.Tensor  # int32 [1]: position of the token fed in
    seed: torch.Tensor  # int64 [1]
    temperature: torch.Tensor  # float32 [batch]
    top_k: torch.Tensor  # int32 [batch]
    top_p: torch.Tensor  # float32 [batch]
    workspace: torch.Tensor  # decode attention's split-K partials
    residual_workspace: torch.Tensor  # the residual projections' split-K partials (empty while they do not split)
    sample_arrivals: torch.Tensor  # int32 [1]: the sampler's arrival counter, with which it advances pos
    graphs: dict = field(default_factory=dict)  # greedy flag -> torch.cuda.CUDAGraph of one decode step


def bucket_for(batch: int, max_bucket: int) -> int:
    return next(b for b in BATCH_BUCKETS if b >= min(batch, max_bucket))


class StaticDecoder:
    def __init__(self, config: ImageGPTConfig, weights: PackedWeights, *, backend: str, use_cuda_graphs: bool):
        self.config, self.weights, self.backend = config, weights, backend
        self.ops = kernel_ops(backend)
        self.device, self.dtype = weights.wte.device, weights.wte.dtype
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda" and backend == "triton"
        self.states: dict[int, BucketState] = {}
        self._graph_pool = None

    # ---- memory ----
    def bucket_bytes(self, batch: int) -> int:
        c = self.config
        itemsize = self.dtype.itemsize
        cache = c.n_layer * 2 * batch * c.n_positions * c.n_embd * itemsize
        activations = batch * (3 * c.n_embd + c.inner_dim) * itemsize + batch * c.n_clusters * 4
        sequences = batch * (c.n_positions + 1) * 8
        workspace = batch * c.n_head * (64 * (c.head_dim + 1) + 1) * 4  # bound of split-K partials + counters
        # the residual projections': at most a split per 512 of K (kernels/linear.py's _SPLIT_MIN_K), fewer counters
        residual_workspace = batch * c.n_embd * (c.inner_dim // 512 + 1) * 4
        return cache + activations + sequences + workspace + residual_workspace

    def check_fits(self, batch: int) -> None:
        """Raise before allocating if a bucket's state would not fit in free GPU memory."""
        if self.device.type != "cuda":
            return
        needed = self.bucket_bytes(batch)
        free, _ = torch.cuda.mem_get_info(self.device)
        if needed > 0.9 * free:
            raise MemoryError(
                f"batch bucket {batch} needs {needed / 2**30:.2f} GiB (KV cache of {self.config.n_positions} "
                f"positions in {self.dtype}) but only {free / 2**30:.2f} GiB of GPU memory is free; use a "
                f"smaller batch or max_batch, or free other caches with release_caches()"
            )

    def state(self, batch: int) -> BucketState:
        if batch in self.states:
            return self.states[batch]
        self.check_fits(batch)
        c, dev, dt = self.config, self.device, self.dtype
        state = BucketState(
            batch=batch,
            kv_cache=torch.zeros(c.n_layer, 2, batch, c.n_head, c.n_positions, c.head_dim, device=dev, dtype=dt),
            x=torch.zeros(batch, c.n_embd, device=dev, dtype=dt),
            q=torch.zeros(batch, c.n_embd, device=dev, dtype=dt),
            attn=torch.zeros(batch, c.n_embd, device=dev, dtype=dt),
            hidden=torch.zeros(batch, c.inner_dim, device=dev, dtype=dt),
            logits=torch.zeros(batch, c.n_clusters, device=dev, dtype=torch.float32),
            ids=torch.zeros(batch, device=dev, dtype=torch.int64),
            sequences=torch.zeros(batch, c.n_positions + 1, device=dev, dtype=torch.int64),
            pos=torch.zeros(1, device=dev, dtype=torch.int32),
            seed=torch.zeros(1, device=dev, dtype=torch.int64),
            temperature=torch.ones(batch, device=dev, dtype=torch.float32),
            top_k=torch.full((batch,), c.n_clusters, device=dev, dtype=torch.int32),
            top_p=torch.ones(batch, device=dev, dtype=torch.float32),
            workspace=self.ops.decode_workspace(batch, c.n_head, c.head_dim, c.n_positions, dev),
            residual_workspace=self.ops.residual_workspace(batch, c.n_embd, (c.n_embd, c.inner_dim), dt, dev),
            sample_arrivals=torch.zeros(1, device=dev, dtype=torch.int32),
        )
        self.states[batch] = state
        return state

    def release_caches(self) -> None:
        self.states.clear()
        self._graph_pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- prefill: a whole prompt through every layer ----
    def prefill(self, ids: torch.Tensor, layer_caches, *, keep_hidden: int | None = None,
                hidden_states: list | None = None) -> torch.Tensor:
        """Run ids [B, S] (positions 0..S-1) through the layers, writing K, V into layer_caches(l) -> (k, v)
        ([B, H, >=S, D] each). Returns the residual stream [B*S, d] after the last block (before ln_f), or
        after block `keep_hidden` (1-based; 0 = the embeddings) if given, stopping there. A `hidden_states`
        list receives a copy of the stream after the embeddings and after every block (the stream itself is
        updated in place)."""
        c, w, ops = self.config, self.weights, self.ops
        B, S = ids.shape
        M, H, D = B * S, c.n_head, c.head_dim
        zero = torch.zeros(1, device=self.device, dtype=torch.int32)
        x = torch.empty(M, c.n_embd, device=self.device, dtype=self.dtype)
        ops.embed(ids.reshape(M), w.wte, w.wpe, zero, seq_len=S, out=x)
        if hidden_states is not None:
            hidden_states.append(x.clone())
        if keep_hidden == 0:
            return x
        q, attn = torch.empty_like(x), torch.empty_like(x)
        hidden = torch.empty(M, c.inner_dim, device=self.device, dtype=self.dtype)
        for i, layer in enumerate(w.layers):
            k_cache, v_cache = layer_caches(i)
            ops.norm_qkv(x, layer.ln_1, layer.c_attn_w, layer.c_attn_b, eps=c.layer_norm_epsilon, q_out=q,
                         k_cache=k_cache, v_cache=v_cache, pos=zero, seq_len=S)
            ops.prefill_attention(q.view(B, S, H, D).transpose(1, 2), k_cache, v_cache, scale=layer.scale,
                                  out=attn.view(B, S, H, D).transpose(1, 2))
            ops.linear_residual(attn, layer.attn_proj_w, layer.attn_proj_b, x)
            ops.norm_linear(x, layer.ln_2, layer.c_fc_w, layer.c_fc_b, eps=c.layer_norm_epsilon,
                            activation="quick_gelu", out=hidden)
            ops.linear_residual(hidden, layer.mlp_proj_w, layer.mlp_proj_b, x)
            if hidden_states is not None:
                hidden_states.append(x.clone())
            if keep_hidden == i + 1:
                break
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """ln_f alone, for the last hidden state (once per call, not per step: PyTorch ops suffice)."""
        return torch_ops.rms_norm(x, self.weights.ln_f, self.config.layer_norm_epsilon).to(x.dtype)

    def lm_head(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """ln_f -> lm_head: float32 logits [M, n_clusters]."""
        return self.ops.norm_linear(x, self.weights.ln_f, self.weights.lm_head_w, None,
                                    eps=self.config.layer_norm_epsilon, out=out, out_dtype=torch.float32)

    # ---- generation ----
    def start(self, state: BucketState, prompt: torch.Tensor, *, greedy: bool) -> None:
        """Prefill prompt [bucket, P] into the bucket's cache and sample token P; leaves pos = P."""
        P = prompt.shape[1]
        if self.use_cuda_graphs and greedy not in state.graphs:
            self._capture(state, greedy)  # before the prompt: warm-up steps scribble on the state
        # The split-K kernels' and the sampler's arrival counters must be zero between launches, and every
        # complete launch leaves them so; a launch stopped between its programs (Ctrl-C or an error under the
        # Triton interpreter) did not, and the stale count made every later step of this bucket merge early. Small
        # memsets per call, outside the graph, start each call clean.
        state.workspace.zero_()
        state.residual_workspace.zero_()
        state.sample_arrivals.zero_()
        cache = state.kv_cache
        x = self.prefill(prompt, lambda i: (cache[i, 0], cache[i, 1]))
        last = x.view(state.batch, P, -1)[:, -1]
        self.lm_head(last, out=state.logits)
        state.sequences[:, :P].copy_(prompt)
        state.pos.fill_(P - 1)
        self.ops.sample_tokens(state.logits, temperature=state.temperature, top_k=state.top_k, top_p=state.top_p,
                               seed=state.seed, pos=state.pos, out_ids=state.ids, sequences=state.sequences,
                               greedy=greedy, arrivals=state.sample_arrivals)  # pos: P after it

    def step(self, state: BucketState, *, greedy: bool) -> None:
        """Feed ids at pos, sample the token at pos + 1, advance pos: a graph replay when captured."""
        graph = state.graphs.get(greedy)
        if graph is not None:
            graph.replay()
        else:
            self._decode_step(state, greedy)

    def decode(self, state: BucketState, steps: int, *, greedy: bool) -> None:
        """`steps` decode steps."""
        for _ in range(steps):
            self.step(state, greedy=greedy)

    def _decode_step(self, s: BucketState, greedy: bool) -> None:
        c, w, ops = self.config, self.weights, self.ops
        B, H, D, eps = s.batch, c.n_head, c.head_dim, c.layer_norm_epsilon
        ops.embed(s.ids, w.wte, w.wpe, s.pos, seq_len=1, out=s.x)
        for i, layer in enumerate(w.layers):
            k_cache, v_cache = s.kv_cache[i, 0], s.kv_cache[i, 1]
            ops.norm_qkv(s.x, layer.ln_1, layer.c_attn_w, layer.c_attn_b, eps=eps, q_out=s.q, k_cache=k_cache,
                         v_cache=v_cache, pos=s.pos, seq_len=1)
            ops.decode_attention(s.q.view(B, H, D), k_cache, v_cache, s.pos, scale=layer.scale,
                                 out=s.attn.view(B, H, D), workspace=s.workspace,
                                 kv_before_wait=B <= ATTENTION_KV_BEFORE_WAIT_MAX_BATCH)
            ops.linear_residual(s.attn, layer.attn_proj_w, layer.attn_proj_b, s.x, workspace=s.residual_workspace)
            ops.norm_linear(s.x, layer.ln_2, layer.c_fc_w, layer.c_fc_b, eps=eps, activation="quick_gelu",
                            out=s.hidden)
            ops.linear_residual(s.hidden, layer.mlp_proj_w, layer.mlp_proj_b, s.x, workspace=s.residual_workspace)
        self.lm_head(s.x, out=s.logits)
        ops.sample_tokens(s.logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                          pos=s.pos, out_ids=s.ids, sequences=s.sequences, greedy=greedy,
                          arrivals=s.sample_arrivals)  # and pos += 1, in the same launch

    def _capture(self, state: BucketState, greedy: bool) -> None:
        """Warm up (compiles the kernels) on a side stream, then capture one decode step into a graph that shares one
        memory pool with the other buckets' graphs; the bucket keeps it only when the capture succeeded. (Graphs of 4
        and 16 steps, one graph launch for several steps, were timed no faster on an H200, 2026-12-04.)"""
        state.pos.zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode_step(state, greedy)
        torch.cuda.current_stream(self.device).wait_stream(side)
        state.pos.zero_()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._graph_pool):
                self._decode_step(state, greedy)
        except RuntimeError as e:
            raise RuntimeError(
                f"CUDA graph capture of the decode step failed for batch bucket {state.batch} ({e}). Run with "
                f"use_cuda_graphs=False to debug the same kernels eagerly, or with {backend.PDL_ENV}=0 to rule out "
                f"programmatic dependent launch."
            ) from e
        state.graphs[greedy] = graph
