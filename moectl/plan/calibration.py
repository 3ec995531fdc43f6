"""The data behind `moectl plan` (moectl/plan/predict.py): GPU kinds, calibrated figures, and every measured run.

Everything here was measured, or fitted to what was measured, with the provenance beside it. The
runs are the `summary.json` / log figures of BENCHMARKS.md (raw files under bench/results/); the
fit that produced the figures of `CALIBRATION` is `bench/fit_plan.py`, which re-fits them from
`MEASURED_RUNS` and prints the predicted-against-measured table.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuKind:
    """One GPU kind: the maker's figures, and the bandwidths the model works with.

    The figures of `Calibration` were measured on the kind `CALIBRATED_ON`; predict.py carries them to the
    other kinds by these figures (what scales how is written there, in `compute_seconds`). Whether runs of a
    kind check the model is `is_calibrated`, read from `MEASURED_RUNS`, never stated here."""

    name: str  # as plan's title writes it
    device_names: tuple[str, ...]  # exactly what torch.cuda.get_device_name() reports for this kind
    peak_flops: float  # dense bf16 (the maker's sheet; the MFU table's figure)
    memory_gib: float  # what torch reports as the device's total memory
    hbm_bytes_per_s: float  # achieved by the streaming passes over parameters (optimizer, grad accumulation)
    allreduce_bytes_per_s: float  # NCCL bus bandwidth within a node (NVLink)
    network_bytes_per_s: float  # per GPU between nodes
    sheet_hbm_bytes_per_s: float  # the maker's memory bandwidth
    sheet_nvlink_bytes_per_s: float  # the maker's NVLink bandwidth per GPU (both directions)


#: The kind the figures of `Calibration` and the achieved bandwidths below were measured on.
CALIBRATED_ON = "h200"

H200 = GpuKind(
    name="H200",
    device_names=("NVIDIA H200",),
    # NVIDIA H200 Tensor Core GPU datasheet (H200 SXM; nvidia.com/en-us/data-center/h200): BF16 Tensor Core
    # 1,979 TFLOPS with sparsity, so 989 dense; 141 GB HBM3e at 4.8 TB/s; NVLink 900 GB/s.
    peak_flops=989e12,
    memory_gib=139.8,
    # profile_ep1_8l_compiled.txt: fused SGD over 5.61 B bf16 parameters (read p, g; write p) and the
    # gradient-accumulation add_ (3 passes of 3 × 11.2 GB) ran at 3.5-4.4 TB/s.
    hbm_bytes_per_s=3.6e12,
    # profile_ep2_8l.txt: ep 2's dense-gradient all-reduce, 1.56 GB per step in 5.1 ms of NCCL kernels.
    allreduce_bytes_per_s=306e9,
    # Not measured (no multi-node run exists): one 400 Gb/s NIC per GPU, the usual H200 HGX node.
    network_bytes_per_s=50e9,
    sheet_hbm_bytes_per_s=4.8e12,
    sheet_nvlink_bytes_per_s=900e9,
)


def scaled_from_h200(
    name: str,
    device_names: tuple[str, ...],
    peak_flops: float,
    memory_gib: float,
    sheet_hbm_bytes_per_s: float,
    sheet_nvlink_bytes_per_s: float,
    network_bytes_per_s: float,
) -> GpuKind:
    """A kind no run has measured: its achieved bandwidths are the H200's measured ones times the ratio of
    the makers' sheets (the same share of the sheet's bandwidth reached on both)."""
    return GpuKind(
        name=name,
        device_names=device_names,
        peak_flops=peak_flops,
        memory_gib=memory_gib,
        hbm_bytes_per_s=H200.hbm_bytes_per_s * sheet_hbm_bytes_per_s / H200.sheet_hbm_bytes_per_s,
        allreduce_bytes_per_s=H200.allreduce_bytes_per_s
        * sheet_nvlink_bytes_per_s
        / H200.sheet_nvlink_bytes_per_s,
        network_bytes_per_s=network_bytes_per_s,
        sheet_hbm_bytes_per_s=sheet_hbm_bytes_per_s,
        sheet_nvlink_bytes_per_s=sheet_nvlink_bytes_per_s,
    )


# The memory torch reports (`total_memory`) for the kinds not measured here is PyTorch's own figure in its
# out-of-memory message ("GPU 0 has a total capacity of … GiB") as printed on each kind in public logs.
GPU_KINDS: dict[str, GpuKind] = {
    "h200": H200,
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM; nvidia.com/en-us/data-center/h100): BF16 Tensor Core
    # 1,979 TFLOPS with sparsity (989 dense), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s. NVIDIA DGX H100
    # datasheet: eight single-port ConnectX-7 at 400 Gb/s, one per GPU.
    "h100": scaled_from_h200(
        name="H100",
        device_names=("NVIDIA H100 80GB HBM3",),
        peak_flops=989e12,
        memory_gib=79.11,
        sheet_hbm_bytes_per_s=3.35e12,
        sheet_nvlink_bytes_per_s=900e9,
        network_bytes_per_s=50e9,
    ),
    # NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM; nvidia.com/en-us/data-center/a100): BFLOAT16
    # Tensor Core 312 TFLOPS (624 with sparsity), 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s. NVIDIA DGX
    # A100 datasheet: eight single-port ConnectX-6 at 200 Gb/s HDR, one per GPU.
    "a100": scaled_from_h200(
        name="A100",
        device_names=("NVIDIA A100-SXM4-80GB",),
        peak_flops=312e12,
        memory_gib=79.15,
        sheet_hbm_bytes_per_s=2.039e12,
        sheet_nvlink_bytes_per_s=600e9,
        network_bytes_per_s=25e9,
    ),
    # NVIDIA HGX B200 specifications (nvidia.com/en-us/data-center/hgx, eight GPUs at 1,000 W): FP16/BF16
    # Tensor Core 36 PFLOPS with sparsity, so 2.25 PFLOPS dense per GPU; 1.44 TB HBM3e (180 GB per GPU);
    # NVLink 1.8 TB/s per GPU. NVIDIA DGX B200 datasheet: 64 TB/s of HBM3e (8 TB/s per GPU), eight
    # single-port ConnectX-7 at 400 Gb/s.
    "b200": scaled_from_h200(
        name="B200",
        device_names=("NVIDIA B200",),
        peak_flops=2250e12,
        memory_gib=178.35,
        sheet_hbm_bytes_per_s=8e12,
        sheet_nvlink_bytes_per_s=1.8e12,
        network_bytes_per_s=50e9,
    ),
}


@dataclass(frozen=True)
class Calibration:
    """Achieved efficiencies per kernel class and the exposed share of each strategy's communication.

    The figures marked "fitted" are written by `python3 bench/fit_plan.py --fit` (it rewrites their values
    below); the others come from profiles and are set by hand with the profile named."""

    # From the kernel times of two profiles (profile_ep1_8l_compiled.txt, profile_proxy48_mb2.txt), as a
    # fraction of peak: dense GEMMs (attention projections, router, lm_head) ran at 802 and 762 TFLOP/s;
    # cuDNN flash attention at 805 and 807 TFLOP/s of the README's 12·L·heads·head_dim·seq formula.
    dense_gemm: float = 0.79
    attention: float = 0.81
    # Expert grouped GEMM: efficiency grows with the rows each expert gets, eff = max · m / (m + half).
    # Fitted to 519 TFLOP/s at 512 rows (8-layer cut) and 625 at 2048 (48-layer proxy); it predicts
    # 586 at 1024 rows, where profile_ep2_8l.txt measured 588 (a held-out check).
    grouped_gemm_max: float = 0.68
    grouped_gemm_half_rows: float = 150.0
    # Memory-bound work per token and layer (norms, rotary, SiLU·up, the one-GPU dispatch's gathers and
    # weighted sums) and per token for the loss, compiled and eager; and the GPU idle time per layer and
    # micro-batch (launch gaps, the dispatch's host sync). Fitted on the one-GPU step times (role "fit");
    # since transformers' experts have their own figure below, the three current-code ep runs set the
    # compiled figure and the idle time (before it, single's slower experts pulled the idle time to 0.875 ms).
    seconds_per_token_layer_compiled: float = 2.29e-7
    seconds_per_token_layer_eager: float = 1e-6
    # Loss kernels per token: compiled 12.6 ms per 32,768 tokens (profile_ep1_8l_compiled.txt), eager
    # log-softmax forward + backward 39 ms per 32,768 tokens plus its fp32 copies (profile_ep1_8l.txt).
    seconds_per_token_loss_compiled: float = 3.85e-7
    seconds_per_token_loss_eager: float = 1.5e-6
    seconds_per_layer_sync: float = 3.62e-4
    # transformers' own experts, which every strategy but ep runs (the sort of the (token, expert) pairs, the
    # gathers and the scatter-add around grouped_mm), beyond what ep's dispatch spends on the same rows on
    # one GPU (its gathers and slot-sum kernels), per token and layer. Fitted on the one-GPU step times of
    # single and ep (role "fit"): on one GPU ep 1 runs measured faster than single.
    seconds_per_token_layer_hf_experts: float = 8.94e-8
    # ep > 1, the once-per-rank dispatch's own GPU time beyond what one GPU runs: building the exchange's
    # index tensors (the send order's scan, the pairs' sort), the gather of the rows to send, the expert
    # rank's weighted sum of a row's pairs (forward and backward), the combine of the returned rows, and
    # the layer's host sync before the exchange. Charged per (token,
    # chosen expert) pair a rank computes, per layer and micro-batch: pairs do not grow with ep, and the
    # runs say the cost does not either (charged per received row, which grows 1.8× from ep 2 to ep 4,
    # the fit needs a negative bandwidth). Fitted on the ep > 1 step times with all_to_all_bytes_per_s
    # (76 ns per pair before the slot-sum kernels, when profile_ep2_alone_prof.txt counted about 80 ms per
    # step of gather-reduce and index kernels at ep 2 on the 8-layer cut; the figure also holds the idle
    # time around them). Refit when the kernels change.
    ep_dispatch_seconds_per_pair: float = 5.65e-8
    # Communication, as the fraction of its transfer time (bytes / link bandwidth) that the step waits
    # for. ep's all-to-all: every exchange is waited for before the compute that needs it (ep_chunks 1,
    # the default), so nothing overlaps; what is fitted is the bandwidth the exchange reaches in step
    # time (the bytes `a2a_bytes_per_step` counts, uneven splits under real routing and the small
    # exchange of each row's choices included). ddp: the share of the gradient all-reduce hidden behind
    # backward (a share: the fit is clamped to [0, 1]; one ddp 2 run sets it). fsdp: gathers and
    # reduce-scatters cost more than their transfers (copy-in/out, no overlap seen).
    all_to_all_bytes_per_s: float = 1.37e11
    ddp_overlap: float = 0.163
    fsdp_exposure: float = 1.12
    tp_overlap: float = 0.0  # tp's all-reduces sit on the forward and backward critical path


CALIBRATION = Calibration()


@dataclass(frozen=True)
class MeasuredRun:
    """One measured GPU run of the qwen3-30b-a3b preset (seq 4096, SGD, synthetic data) with `model` and
    `train` overriding its settings; in pure bf16 (`train.precision=bf16`, what GPU runs trained in before
    `mixed`) unless `train` names its precision. `role`: "fit" (sets a fitted figure above), "holdout" (checked,
    never fitted), "profiled" (torch.profiler ran on some of its timed steps: checked, not fitted),
    "superseded" (the code that ran has since changed: shown, not held to the bounds), "out of scope" (see
    the note), "pending" (scripted in bench/, not run yet: its prediction is written down in BENCHMARKS.md
    before the run). `predicted_before`: (tokens/s per GPU, peak GiB) written down before the run was
    made; `a2a_bytes_per_step`: what ep's exchanges sent per rank and step (summary.json)."""

    name: str
    date: str
    machine: str
    recipe: str  # "<key of RECIPES> <run name>"
    strategy: str
    world: int
    ep: int
    tp: int
    micro_batch: int
    global_batch: int
    model: dict
    compile: bool
    activation_checkpointing: bool
    tokens_per_s_per_gpu: float | None  # None while the run is "pending"
    peak_mem_gib: float | None
    role: str
    note: str = ""
    seq_len: int = 4096
    train: dict = field(default_factory=dict)
    a2a_bytes_per_step: float | None = None
    predicted_before: tuple[float, float] | None = None

    @property
    def precision(self) -> str:
        """The `train.precision` it ran in: bf16 unless `train` says otherwise."""
        return self.train.get("precision", "bf16")

    @property
    def gpu(self) -> str:
        """The GPU kind it ran on (a key of GPU_KINDS): `machine` without its count ("h200x4" -> "h200")."""
        return self.machine.split("x")[0]

    @property
    def script(self) -> str:
        return RECIPES[self.recipe.split()[0]][0]

    @property
    def source(self) -> str:
        """The raw result this run's figures come from."""
        key, run = self.recipe.split()
        return RECIPES[key][1].format(run=run)


L16, L8, L4, FULL = {"num_layers": 16}, {"num_layers": 8}, {"num_layers": 4}, {}
PROXY = {"num_experts": 32}  # one GPU's share of ep 4: 48 layers of 32 experts
CHUNKED = {"loss_chunk_tokens": 4096}  # lm_head and loss chunk by chunk
SUPERSEDED = "code since changed: "
ONE_ROW_PER_CHOICE = SUPERSEDED + "one row per chosen expert in each exchange (before once-per-rank)"
#: One-GPU ep runs of the dispatch before once-per-rank and before the slot-sum kernels. Nothing is exchanged
#: on one GPU; the once-per-rank dispatch measured +1.4 % on the same layout ("ep1 8l mb2 features off"
#: against 72,849), the slot-sum kernels +7.2 % side by side ("ep1 8l mb2 slot sums"). Held out, not fitted
#: (except the eager runs, the only eager figures there are): within the model's error, so they stay bound.
OLD_DISPATCH = (
    "one GPU, code before once-per-rank and the slot-sum kernels (+1.4 % and +7.2 % since on ep1 8l mb2)"
)
LANE = "ran on one GPU of the four-GPU host beside the other lanes (shared CPUs)"
BEFORE_SLOT_SUMS = SUPERSEDED + "the dispatch's slot sums as reductions over the slot dim (commit 01ec5c3)"
SIDE_BY_SIDE = "the same layout on the code before the slot-sum kernels, right after on the same GPUs: "
FIRST_HOST = (
    "the first host of the lease (another machine): the same code ran 10-15 % slower there than on the "
    "host of the side-by-side pairs, a difference between hosts the model has no term for"
)
FEATURES_ON = "Qwen3's balancing (aux loss 0.001) and load statistics on, which the model does not count"
FEATURES_OFF = {"aux_loss_coef": 0.0, "expert_load_stats": False}  # what the model counts: neither

#: recipe key -> (the script that ran it, its raw result with {run} the run name)
RECIPES = {
    "c": ("recipe one-gpu-compiled", "bench/results/2026-11-29-h200x1/{run}_summary.json"),
    "p": ("recipe one-gpu-proxy", "bench/results/2026-11-29-h200x1/{run}_summary.json"),
    "b1": ("recipe one-gpu-bench", "bench/results/2026-11-29-h200x1/bench.json#{run}"),
    "a": ("recipe two-gpu-8l", "bench/results/2026-11-29-h200x2/{run}_summary.json"),
    "f": ("recipe two-gpu-full-model", "bench/results/2026-11-29-h200x2-b/{run}_summary.json"),
    "b2": ("recipe two-gpu-bench", "bench/results/2026-11-29-h200x2-b/bench2/{run}_summary.json"),
    "b2p": ("recipe two-gpu-bench", "bench/results/2026-11-29-h200x2-b/{run}_summary.json"),
    "1": ("recipe one-gpu-8l", "bench/results/2026-11-28-h200x1/{run}.log"),
    "1b": ("recipe one-gpu-8l (with the levers, 2026-11-28)", "bench/results/2026-11-28-h200x1-b/{run}.log"),
    "4b": ("recipe four-gpu-batch", "bench/results/2026-11-29-h200x4/summaries.jsonl#{run}"),
    "2e": ("recipe two-gpu-ep-alone", "bench/results/2026-11-29-h200x2-c/summaries.jsonl#{run}"),
    "4d": ("recipe four-gpu-dispatch", "bench/results/2026-11-29-h200x4-d/summaries.jsonl#{run}"),
    "4e": ("recipe one-gpu-dispatch", "bench/results/2026-11-29-h200x4-e/summaries.jsonl#{run}"),
    "4f": ("recipe four-gpu-dispatch-pairs", "bench/results/2026-11-29-h200x4-f/summaries.jsonl#{run}"),
    "4g": ("recipe four-gpu-dispatch-more", "bench/results/2026-11-29-h200x4-g/summaries.jsonl#{run}"),
    "b4": ("recipe four-gpu-bench", "not run yet: {run}"),
    "4": ("recipe four-gpu-full-model", "not run yet: {run}"),
    "c1": ("recipe four-gpu-layouts", "not run yet: {run}"),
    "h1": ("recipe one-gpu-h100-calibration", "not run yet: {run}"),
}
# fmt: off
MEASURED_RUNS: list[MeasuredRun] = [
    # name                      date          machine   recipe                   strategy  W ep tp mb  gb model  compile AC     tok/s/GPU GiB     role
    MeasuredRun("ep1 8l mb2",           "2026-11-29", "h200x1", "c ep1_8l_closs",        "ep",     1, 1, 1, 2, 8,  L8,    True,  False, 72849, 35.31, "superseded",
                SUPERSEDED + "the dispatch before once-per-rank; the same layout on the current code: ep1 8l mb2 features off"),
    MeasuredRun("ep1 8l mb4",           "2026-11-29", "h200x1", "c ep1_8l_closs_mb4",    "ep",     1, 1, 1, 4, 8,  L8,    True,  False, 82986, 49.09, "holdout", OLD_DISPATCH),
    MeasuredRun("ep1 8l mb2 AC",        "2026-11-29", "h200x1", "c ep1_8l_closs_ac",     "ep",     1, 1, 1, 2, 8,  L8,    True,  True,  60546, 26.58, "holdout", OLD_DISPATCH),
    MeasuredRun("single 8l mb2",        "2026-11-29", "h200x1", "c single_8l_closs",     "single", 1, 1, 1, 2, 8,  L8,    True,  False, 74736, 35.32, "fit"),
    MeasuredRun("proxy48 mb1",          "2026-11-29", "h200x1", "p proxy48_mb1",         "ep",     1, 1, 1, 1, 8,  PROXY, True,  False, 15144, 62.67, "holdout", OLD_DISPATCH),
    MeasuredRun("proxy48 mb2",          "2026-11-29", "h200x1", "p proxy48_mb2",         "ep",     1, 1, 1, 2, 8,  PROXY, True,  False, 17776, 91.99, "holdout", OLD_DISPATCH),
    MeasuredRun("proxy48 mb2 profiled", "2026-11-29", "h200x1", "p proxy48_mb2_prof",    "ep",     1, 1, 1, 2, 8,  PROXY, True,  False, 15989, 91.99, "superseded",
                SUPERSEDED + "the dispatch before once-per-rank and the slot-sum kernels, and torch.profiler on 2 of its 4 "
                "timed steps: the profiler cost 10 % (against proxy48 mb2's 17,776), the slot sums gave the proxy +7.1 % "
                "(proxy48 mb3 chunked slot sums)"),
    MeasuredRun("bench1 single 4l",     "2026-11-29", "h200x1", "b1 single",             "single", 1, 1, 1, 2, 8,  L4,    True,  False, 118965, 21.54, "fit"),
    MeasuredRun("bench1 ddp 4l",        "2026-11-29", "h200x1", "b1 ddp",                "single", 1, 1, 1, 2, 8,  L4,    True,  False, 118743, 21.54, "holdout",
                "ddp on one process trains the unwrapped model: single's code"),
    MeasuredRun("bench1 fsdp 4l",       "2026-11-29", "h200x1", "b1 fsdp",               "single", 1, 1, 1, 2, 8,  L4,    True,  False, 118510, 21.54, "holdout",
                "fsdp on one process trains the unwrapped model: single's code"),
    MeasuredRun("bench1 ep 4l",         "2026-11-29", "h200x1", "b1 ep",                 "ep",     1, 1, 1, 2, 8,  L4,    True,  False, 119137, 21.54, "holdout", OLD_DISPATCH),
    MeasuredRun("bench2 single 4l",     "2026-11-29", "h200x2", "b2 single",             "single", 1, 1, 1, 2, 8,  L4,    True,  False, 119966, 21.54, "holdout"),
    MeasuredRun("ep2 8l",               "2026-11-29", "h200x2", "a ep2_8l",              "ep",     2, 2, 1, 2, 16, L8,    True,  False, 57850, 26.68, "superseded", ONE_ROW_PER_CHOICE),
    MeasuredRun("fsdp2 8l",             "2026-11-29", "h200x2", "a fsdp2_8l",            "fsdp",   2, 1, 1, 2, 16, L8,    True,  False, 53312, 32.41, "fit"),
    MeasuredRun("ddp2 8l",              "2026-11-29", "h200x2", "a ddp2_8l",             "ddp",    2, 1, 1, 2, 16, L8,    True,  False, 68880, 45.76, "fit"),
    MeasuredRun("ep2 full mb2",         "2026-11-29", "h200x2", "f ep2_full_mb2",        "ep",     2, 2, 1, 2, 8,  FULL,  True,  False, 12797, 120.06, "superseded", ONE_ROW_PER_CHOICE),
    MeasuredRun("fsdp2 full mb1",       "2026-11-29", "h200x2", "f fsdp2_full",          "fsdp",   2, 1, 1, 1, 8,  FULL,  True,  False, 6910, 117.85, "holdout"),
    MeasuredRun("ep2 full eager mb1",   "2026-11-29", "h200x2", "f ep2_full_eager",      "ep",     2, 2, 1, 1, 8,  FULL,  False, False, 7288, 104.57, "superseded", ONE_ROW_PER_CHOICE),
    MeasuredRun("naive ep2 full eager", "2026-11-29", "h200x2", "f naive2_full",         "naive_ep", 2, 2, 1, 1, 8, FULL, False, False, 1098, 97.32, "out of scope",
                "examples/naive_ep/naive_ep.py loops over its 64 local experts in Python in every layer: a layout plan "
                "does not offer, and a kernel class the model has no figure for"),
    MeasuredRun("bench2 ddp 4l",        "2026-11-29", "h200x2", "b2 ddp",                "ddp",    2, 1, 1, 2, 8,  L4,    True,  False, 106751, 27.34, "holdout"),
    MeasuredRun("bench2 fsdp 4l",       "2026-11-29", "h200x2", "b2 fsdp",               "fsdp",   2, 1, 1, 2, 8,  L4,    True,  False, 85304, 20.96, "fit"),
    MeasuredRun("bench2 tp 4l",         "2026-11-29", "h200x2", "b2 tp",                 "tp",     2, 1, 2, 2, 8,  L4,    True,  False, 70289, 15.91, "holdout"),
    MeasuredRun("bench2 ep 4l",         "2026-11-29", "h200x2", "b2 ep",                 "ep",     2, 2, 1, 2, 8,  L4,    True,  False, 101462, 17.28, "superseded", ONE_ROW_PER_CHOICE),
    MeasuredRun("ep2 8l profiled",      "2026-11-29", "h200x2", "b2p ep2_8l_prof",       "ep",     2, 2, 1, 2, 16, L8,    True,  False, 63175, 26.67, "superseded", ONE_ROW_PER_CHOICE),
    MeasuredRun("ep1 8l eager mb2",     "2026-11-28", "h200x1", "1b ep1_8l_gather",      "ep",     1, 1, 1, 2, 8,  L8,    False, False, 49169, 49.18, "fit", OLD_DISPATCH),
    MeasuredRun("ep1 8l eager mb4",     "2026-11-28", "h200x1", "1b ep1_8l_mb4",         "ep",     1, 1, 1, 4, 8,  L8,    False, False, 52943, 77.41, "fit", OLD_DISPATCH),
    MeasuredRun("single 8l eager mb2",  "2026-11-28", "h200x1", "1 single_8l",           "single", 1, 1, 1, 2, 8,  L8,    False, False, 42459, 49.19, "superseded",
                SUPERSEDED + "foreach SGD before the fused one"),
    MeasuredRun("ep1 8l eager, call 1", "2026-11-28", "h200x1", "1 ep1_8l",              "ep",     1, 1, 1, 2, 8,  L8,    False, False, 44385, 49.18, "superseded",
                SUPERSEDED + "index_add_ in the dispatch's backward, foreach SGD"),
    MeasuredRun("ep1 8l compiled layers", "2026-11-28", "h200x1", "1b ep1_8l_compile",   "ep",     1, 1, 1, 2, 8,  L8,    True,  False, 67526, 46.29, "superseded",
                SUPERSEDED + "the loss ran eager in fp32 (compile now covers it)"),
    MeasuredRun("single 8l compiled layers", "2026-11-28", "h200x1", "1b single_8l_compile", "single", 1, 1, 1, 2, 8, L8, True, False, 66977, 46.30, "superseded",
                SUPERSEDED + "the loss ran eager in fp32 (compile now covers it)"),
    # ---- 2026-11-29 evening, the once-per-rank dispatch: four H200s (three lanes at once, then ep 4 alone), two H200s (alone)
    MeasuredRun("ep1 8l mb2 features off", "2026-11-29", "h200x4", "4b head_ep1_off",    "ep",     1, 1, 1, 2, 8,  L8,    True,  False, 73860, 34.72, "holdout",
                LANE + "; balancing and load statistics off, as in the runs before them"),
    MeasuredRun("ep1 8l mb2 features on", "2026-11-29", "h200x4", "4b head_ep1_on",      "ep",     1, 1, 1, 2, 8,  L8,    True,  False, 71875, 34.72, "holdout",
                LANE + "; clipping every step, cosine schedule, aux loss, router bias and load statistics on "
                "(+2.8 % step time, which the model does not count)"),
    MeasuredRun("ep1 8l mb16 chunked",  "2026-11-29", "h200x4", "4b speed_ep_8l_mb16_chunk", "ep", 1, 1, 1, 16, 16, L8,    True,  False, 87505, 87.86, "holdout",
                LANE + "; one micro-batch per step; " + FEATURES_ON, train=CHUNKED),
    MeasuredRun("proxy48 mb3 chunked",  "2026-11-29", "h200x4", "4b speed_proxy48_mb3_chunk", "ep", 1, 1, 1, 3, 6, PROXY, True,  False, 17768, 117.92, "holdout",
                LANE + "; " + FEATURES_ON, train=CHUNKED),
    MeasuredRun("single 8l mb4",        "2026-11-29", "h200x4", "4b speed_single_8l_ref", "single", 1, 1, 1, 4, 16, L8,    True,  False, 81562, 48.46, "holdout",
                LANE + "; " + FEATURES_ON),
    MeasuredRun("ep2 8l lane A",        "2026-11-29", "h200x4", "4b ep2_8l_chunks1",     "ep",     2, 2, 1, 2, 16, L8,    True,  False, 51817, 26.27, "superseded",
                BEFORE_SLOT_SUMS + "; " + "ran on two GPUs of the four-GPU host beside the other lanes (shared CPUs): 2.5 % below the same run alone",
                a2a_bytes_per_step=4309833312),
    MeasuredRun("ep2 8l lane A chunks2", "2026-11-29", "h200x4", "4b ep2_8l_chunks2",    "ep",     2, 2, 1, 2, 16, L8,    True,  False, 53990, 26.28, "out of scope",
                "parallel.ep_chunks 2, which plan does not model (off by default; alone it measured 11 % slower than 1); "
                "beside the other lanes", a2a_bytes_per_step=4309743264),
    MeasuredRun("ep4 8l",               "2026-11-29", "h200x4", "4b ep4_8l_chunks1",     "ep",     4, 4, 1, 2, 32, L8,    True,  False, 48317, 22.28, "superseded",
                BEFORE_SLOT_SUMS + "; " + "alone on the four-GPU host; the layout of recipe weak-scaling's weak_ep4, predicted before",
                a2a_bytes_per_step=11794024848, predicted_before=(53817, 21.5)),
    MeasuredRun("ep4 8l chunks2",       "2026-11-29", "h200x4", "4b ep4_8l_chunks2",     "ep",     4, 4, 1, 2, 32, L8,    True,  False, 45830, 22.27, "out of scope",
                "parallel.ep_chunks 2, which plan does not model (off by default; 5 % slower than 1 here)",
                a2a_bytes_per_step=11795369328),
    MeasuredRun("ep4 full mb2",         "2026-11-29", "h200x4", "4b ep4_full_mb2",       "ep",     4, 4, 1, 2, 16, FULL,  True,  False, 9518, 93.95, "superseded",
                BEFORE_SLOT_SUMS + "; " + "alone on the four-GPU host; " + FEATURES_ON, a2a_bytes_per_step=35165583984, predicted_before=(10351, 91.9)),
    MeasuredRun("ep2 8l alone",         "2026-11-29", "h200x2", "2e ep2_alone_chunks1",  "ep",     2, 2, 1, 2, 16, L8,    True,  False, 53133, 26.27, "superseded",
                BEFORE_SLOT_SUMS + "; " + "alone on the two-GPU host", a2a_bytes_per_step=4309940208),
    MeasuredRun("ep2 8l alone chunks2", "2026-11-29", "h200x2", "2e ep2_alone_chunks2",  "ep",     2, 2, 1, 2, 16, L8,    True,  False, 47215, 26.28, "out of scope",
                "parallel.ep_chunks 2, which plan does not model (off by default; 11 % slower than 1 here)",
                a2a_bytes_per_step=4309849776),
    MeasuredRun("ep2 8l alone profiled", "2026-11-29", "h200x2", "2e ep2_alone_prof",    "ep",     2, 2, 1, 2, 16, L8,    True,  False, 53505, 26.27, "superseded",
                BEFORE_SLOT_SUMS + "; " + "torch.profiler on 2 of its 5 timed steps (profile_ep2_alone_prof.txt)", a2a_bytes_per_step=4309923648),
    # ---- 2026-11-29 night, the slot sums as one gather per slot (one elementwise kernel), four H200s ----
    MeasuredRun("ep1 8l mb2 slot sums", "2026-11-29", "h200x4", "4e disp_ep1_after",     "ep",     1, 1, 1, 2, 8,  L8,    True,  False, 77697, 34.72, "fit",
                "alone; " + SIDE_BY_SIDE + "72,485 (ep1 8l mb2 before slot sums)"),
    MeasuredRun("ep1 8l mb2 before slot sums", "2026-11-29", "h200x4", "4f disp_ep1_before", "ep",  1, 1, 1, 2, 8,  L8,    True,  False, 72485, 34.72, "superseded",
                BEFORE_SLOT_SUMS + "; alone, beside its twin ep1 8l mb2 slot sums"),
    MeasuredRun("ep1 8l mb16 chunked slot sums", "2026-11-29", "h200x4", "4e speed_ep_8l_mb16_chunk", "ep", 1, 1, 1, 16, 16, L8, True, False, 92397, 87.86, "fit",
                "one micro-batch per step; single 8l mb4 slot-sums night ran on another GPU at once; " + FEATURES_ON, train=CHUNKED),
    MeasuredRun("single 8l mb4 night",  "2026-11-29", "h200x4", "4e speed_single_8l_ref", "single", 1, 1, 1, 4, 16, L8,    True,  False, 80365, 48.46, "holdout",
                "beside ep1 8l mb16 chunked slot sums on another GPU; " + FEATURES_ON),
    MeasuredRun("proxy48 mb3 chunked slot sums", "2026-11-29", "h200x4", "4e speed_proxy48_mb3_chunk", "ep", 1, 1, 1, 3, 6, PROXY, True, False, 19027, 117.92, "fit",
                "alone; " + FEATURES_ON, train=CHUNKED),
    MeasuredRun("ep2 8l slot sums",     "2026-11-29", "h200x4", "4f disp_ep2_after",     "ep",     2, 2, 1, 2, 16, L8,    True,  False, 60005, 26.27, "fit",
                "alone on two GPUs of the four; " + SIDE_BY_SIDE + "50,053", a2a_bytes_per_step=4309775712),
    MeasuredRun("ep2 8l slot sums again", "2026-11-29", "h200x4", "4g disp_ep2_again_after", "ep",  2, 2, 1, 2, 16, L8,    True,  False, 58694, 26.27, "holdout",
                "the pair repeated: " + SIDE_BY_SIDE + "54,230", a2a_bytes_per_step=4309711440),
    MeasuredRun("ep2 8l slot sums, first host", "2026-11-29", "h200x4", "4d disp_ep2_after", "ep",  2, 2, 1, 2, 16, L8,    True,  False, 52940, 26.27, "out of scope",
                FIRST_HOST, a2a_bytes_per_step=4309767936),
    MeasuredRun("ep2 8l before slot sums", "2026-11-29", "h200x4", "4f disp_ep2_before", "ep",      2, 2, 1, 2, 16, L8,    True,  False, 50053, 26.27, "superseded",
                BEFORE_SLOT_SUMS, a2a_bytes_per_step=4309767360),
    MeasuredRun("ep2 8l before slot sums again", "2026-11-29", "h200x4", "4g disp_ep2_again_before", "ep", 2, 2, 1, 2, 16, L8, True, False, 54230, 26.27, "superseded",
                BEFORE_SLOT_SUMS, a2a_bytes_per_step=4309800432),
    MeasuredRun("ep4 8l slot sums",     "2026-11-29", "h200x4", "4f disp_ep4_after",     "ep",     4, 4, 1, 2, 32, L8,    True,  False, 55756, 22.27, "fit",
                "alone; " + SIDE_BY_SIDE + "43,895", a2a_bytes_per_step=11794469088),
    MeasuredRun("ep4 8l slot sums, first host", "2026-11-29", "h200x4", "4d disp_ep4_after", "ep",  4, 4, 1, 2, 32, L8,    True,  False, 47606, 22.27, "out of scope",
                FIRST_HOST, a2a_bytes_per_step=11794717248),
    MeasuredRun("ep4 8l before slot sums", "2026-11-29", "h200x4", "4f disp_ep4_before", "ep",      4, 4, 1, 2, 32, L8,    True,  False, 43895, 22.28, "superseded",
                BEFORE_SLOT_SUMS, a2a_bytes_per_step=11795198064),
    MeasuredRun("ep4 full mb2 slot sums", "2026-11-29", "h200x4", "4g disp_ep4_full_after", "ep",  4, 4, 1, 2, 16, FULL,  True,  False, 10801, 93.95, "holdout",
                "alone; " + SIDE_BY_SIDE + "9,478; " + FEATURES_ON, a2a_bytes_per_step=35170409520),
    MeasuredRun("ep4 full mb2 slot sums, first host", "2026-11-29", "h200x4", "4d disp_ep4_full", "ep", 4, 4, 1, 2, 16, FULL, True, False, 9687, 93.95, "out of scope",
                FIRST_HOST + "; " + FEATURES_ON, a2a_bytes_per_step=35164033632),
    MeasuredRun("ep4 full mb2 before slot sums", "2026-11-29", "h200x4", "4g disp_ep4_full_before", "ep", 4, 4, 1, 2, 16, FULL, True, False, 9478, 93.95, "superseded",
                BEFORE_SLOT_SUMS + "; " + FEATURES_ON, a2a_bytes_per_step=35167964784),
    MeasuredRun("ep2 8l chunks2 slot sums", "2026-11-29", "h200x4", "4g disp_ep2_chunks2_after", "ep", 2, 2, 1, 2, 16, L8, True, False, 55588, 26.27, "out of scope",
                "parallel.ep_chunks 2, which plan does not model (off by default; 5 % slower than 1 here)", a2a_bytes_per_step=4309843392),
    MeasuredRun("ep4 8l chunks2 slot sums", "2026-11-29", "h200x4", "4g disp_ep4_chunks2_after", "ep", 4, 4, 1, 2, 32, L8, True, False, 49911, 22.27, "out of scope",
                "parallel.ep_chunks 2, which plan does not model (off by default; 10 % slower than 1 here)", a2a_bytes_per_step=11795137632),
    # ---- four H200s: scripted, not run yet ----
    MeasuredRun("fsdp4 full eager mb1", "pending",    "h200x4", "4 fsdp4",               "fsdp",   4, 1, 1, 1, 16, FULL,  False, False, None, None, "pending"),
    MeasuredRun("bench4 fsdp",          "pending",    "h200x4", "b4 fsdp",               "fsdp",   4, 1, 1, 1, 16, FULL,  True,  False, None, None, "pending"),
    MeasuredRun("bench4 tp",            "pending",    "h200x4", "b4 tp",                 "tp",     4, 1, 4, 1, 16, FULL,  True,  False, None, None, "pending"),
    MeasuredRun("bench4 mixed 2x2",     "pending",    "h200x4", "b4 mixed",              "mixed",  4, 1, 2, 1, 16, FULL,  True,  False, None, None, "pending"),
    MeasuredRun("bench4 ep",            "pending",    "h200x4", "b4 ep",                 "ep",     4, 4, 1, 1, 16, FULL,  True,  False, None, None, "pending"),
    MeasuredRun("fsdp4 gb8",            "pending",    "h200x4", "c1 fsdp_30b",           "fsdp",   4, 1, 1, 1, 8,  FULL,  True,  False, None, None, "pending"),
    MeasuredRun("tp4 gb2",              "pending",    "h200x4", "c1 tp_30b",             "tp",     4, 1, 4, 1, 2,  FULL,  True,  False, None, None, "pending"),
    MeasuredRun("mixed 2x2 gb4",        "pending",    "h200x4", "c1 mixed_30b",          "mixed",  4, 1, 2, 1, 4,  FULL,  True,  False, None, None, "pending"),
    MeasuredRun("ddp4 16l",             "pending",    "h200x4", "c1 ddp_16l",            "ddp",    4, 1, 1, 1, 8,  L16,   True,  False, None, None, "pending"),
    MeasuredRun("fsdp4 16l",            "pending",    "h200x4", "c1 fsdp_16l",           "fsdp",   4, 1, 1, 1, 8,  L16,   True,  False, None, None, "pending"),
    # ---- one H100 (recipe one-gpu-h100-calibration): predicted before the runs (bench/predict_h100.py,
    # BENCHMARKS.md "The planner for H100, A100 and B200"). Once run, each line takes its date, its
    # summary.json's tokens_per_s_per_device and peak_mem_gib, the role fit or holdout, and RECIPES["h1"]
    # the results' path (bench/results/<date>-h100x1/summaries.jsonl#{run}).
    MeasuredRun("h100 ep1 8l mb1",      "pending",    "h100x1", "h1 h100_ep1_mb1",       "ep",     1, 1, 1, 1, 8,  L8,    True,  False, None, None, "pending",
                train=FEATURES_OFF, predicted_before=(58351, 27.7)),
    MeasuredRun("h100 ep1 8l mb2",      "pending",    "h100x1", "h1 h100_ep1_mb2",       "ep",     1, 1, 1, 2, 8,  L8,    True,  False, None, None, "pending",
                train=FEATURES_OFF, predicted_before=(69637, 34.5)),
    MeasuredRun("h100 single 8l mb2",   "pending",    "h100x1", "h1 h100_single_mb2",    "single", 1, 1, 1, 2, 8,  L8,    True,  False, None, None, "pending",
                train=FEATURES_OFF, predicted_before=(64998, 34.5)),
    MeasuredRun("h100 ep1 8l mb8",      "pending",    "h100x1", "h1 h100_ep1_mb8",       "ep",     1, 1, 1, 8, 8,  L8,    True,  False, None, None, "pending",
                train=FEATURES_OFF, predicted_before=(81452, 66.2)),
    MeasuredRun("h100 ep1 8l mb8 chunked", "pending", "h100x1", "h1 h100_ep1_mb8_chunk", "ep",     1, 1, 1, 8, 8,  L8,    True,  False, None, None, "pending",
                train={**FEATURES_OFF, **CHUNKED}, predicted_before=(81452, 49.5)),
    MeasuredRun("h100 single 8l mb8 chunked", "pending", "h100x1", "h1 h100_single_mb8_chunk", "single", 1, 1, 1, 8, 8, L8, True, False, None, None, "pending",
                train={**FEATURES_OFF, **CHUNKED}, predicted_before=(75177, 49.5)),
]
# fmt: on

#: The roles of runs that check the model (tests/test_plan.py holds them to its bounds).
CHECKED_ROLES = ("fit", "holdout", "profiled")


def is_calibrated(kind: str) -> bool:
    """Whether measured runs on GPUs of `kind` check the model (a run of role fit, holdout or profiled).
    Until one does, plan marks the kind's predictions "uncalibrated": figures from the makers' sheets, the
    efficiencies measured on CALIBRATED_ON assumed to carry over."""
    return any(run.gpu == kind and run.role in CHECKED_ROLES for run in MEASURED_RUNS)


def precision_calibrated(precision: str) -> bool:
    """Whether measured runs in `precision` (a `train.precision`) check the model: until one does, plan
    marks what that precision adds (for `mixed`: fp32 reductions, the optimizer's pass over fp32 state, the
    casts, the fp32 residual stream) "uncalibrated"."""
    return any(run.precision == precision and run.role in CHECKED_ROLES for run in MEASURED_RUNS)


#: The tiny preset's GPU runs (tiny_*.log and tiny_*_gpu*: 5-24k tokens/s at 0.1 GiB, MFU 0.0 %) are
#: launch-bound at hidden size 64, a regime the model has no term for; plan never proposes such a run.
