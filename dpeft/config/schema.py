"""The run configuration's schema: nested keyword-only dataclasses, one per section.

Every field has a default and a one-line help string (``metadata["help"]``); the config
reference (``docs/reference/config.md``, ``python -m dpeft.config``) is generated from these. Sections whose content
depends on a registered implementation (``strategy.options``, ``codec.options``) stay plain
mappings here; each family parses them into its own typed options (see :mod:`dpeft.validate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: the largest ``transport.chunk_bytes`` / ``split.chunk_bytes`` (gRPC messages stay small; a worker
#: accepts downloads in chunks up to this size from any coordinator)
MAX_CHUNK_BYTES = 64 * 1024 * 1024
#: the smallest: below it a transfer is mostly per-message overhead (and ``chunk_bytes=4``, meant as
#: 4 MiB, would send an adapter 4 bytes at a time)
MIN_CHUNK_BYTES = 4096


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors dataclasses naming
    """A dataclass field with a default (copied when mutable) and a help string."""
    if isinstance(default, (list, dict)):
        return field(default_factory=default.copy, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True)
class ModelConfig:
    """Which frozen base model to load."""

    name: str = _f("minilm", "built-in model: minilm (all-MiniLM-L6-v2) or smollm2 (SmolLM2-135M GGUF); ignored when path is set")
    path: str | None = _f(None, "a local Hugging Face model directory instead of a built-in model")
    gguf_file: str | None = _f(None, "GGUF file name inside path (needs the gguf package); read once and kept as an ordinary model directory under $DPEFT_CACHE (default ~/.cache/dpeft)")
    task: str = _f("seq_cls", "seq_cls (classification head on top) or causal_lm (next-token loss)")
    max_length: int = _f(64, "tokens per example after truncation")
    layers: int | None = _f(None, "keep only the first N transformer layers of the base (quick runs and tests); null = all")
    dropout: float | None = _f(
        None,
        "set every dropout probability of the base model (hidden, attention, classifier) to this; null = the checkpoint's own (MiniLM: 0.1). train.lockstep needs 0",
    )
    quantization: str = _f(
        "none",
        "store the frozen base in fewer bits through bitsandbytes (QLoRA): none, nf4 or fp4 (4-bit), int8 (LLM.int8); the adapter stays fp32",
    )
    quantization_options: dict[str, Any] = _f({}, "options of a quantized base (see model.quantization_options.* below)")


@dataclass(kw_only=True)
class AdapterConfig:
    """The PEFT method and its options (any method Hugging Face peft offers)."""

    method: str = _f("lora", "peft method: lora, dora, ia3, prompt_tuning, prefix_tuning, p_tuning, loha, lokr, adalora, ...; or dpeft's own loreft, direft (ReFT) and houlsby, pfeiffer (bottleneck adapters)")
    r: int = _f(8, "LoRA-family rank (loreft/direft: the intervention rank)")
    alpha: int = _f(16, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = _f(0.0, "dropout on the adapter input")
    target_modules: list[str] | None = _f(None, "module names to adapt; null = a per-model default (query/value for BERT, q_proj/v_proj for Llama)")
    modules_to_save: list[str] | None = _f(None, "extra modules trained and exchanged in full; null = the classifier head for seq_cls, none for causal_lm")
    num_virtual_tokens: int = _f(16, "prompt/prefix tuning: number of virtual tokens")
    options: dict[str, Any] = _f({}, "more keyword arguments passed unchanged to the peft config class; for loreft, direft, houlsby and pfeiffer the typed options below")


@dataclass(kw_only=True)
class DataConfig:
    """Where examples come from, what they look like, and how they are split among clients."""

    dataset: str = _f("rotten_tomatoes", "rotten_tomatoes, reuters_r8, file (a CSV/JSONL/Parquet/Arrow file at data.path), hf (a Hugging Face save_to_disk directory, or Parquet/Arrow files, at data.path) or a registered plug-in dataset loader")
    options: dict[str, Any] = _f({}, "options of a plug-in dataset loader (its own typed options)")
    path: str | None = _f(None, "data file for dataset=file (.csv, .tsv, .jsonl, .parquet, .arrow) or directory for dataset=hf (save_to_disk output: a Dataset, or a DatasetDict whose train/test splits are used)")
    test_path: str | None = _f(None, "optional held-out file or directory; otherwise the test split of a DatasetDict at data.path, else test examples are split off data.path")
    format: str = _f(
        "auto",
        "classification (text + label), text (next-token loss on the whole text), instruction (prompt + response, loss on the response only) or chat (messages through the tokenizer's chat template, loss on the assistant turns); auto = classification for model.task=seq_cls, text for causal_lm",
    )
    text_column: str = _f("text", "column holding the text (dataset=file, format classification or text)")
    label_column: str | None = _f(
        None,
        "column holding the class label (dataset=file); null = label for format=classification. With instruction or chat files it gives the class used by data.partition=dirichlet",
    )
    prompt_column: str = _f("prompt", "instruction/chat files: column holding the prompt (the user turn)")
    response_column: str = _f("response", "instruction/chat files: column holding the reference response (the assistant turn)")
    messages_column: str = _f(
        "messages", "chat files: column holding a list of {role, content} messages (roles system/user/assistant; the last one is the assistant's answer); rows without it use the prompt/response columns"
    )
    system_prompt: str | None = _f(None, "instruction/chat: a system prompt put before every prompt (chat: as a system turn, unless the row has its own)")
    instruction: str | None = _f(
        None,
        "instruction/chat: template of the prompt with {text} where the example's text (built-in corpora) or prompt column goes; null = a per-dataset default (rotten_tomatoes: fresh or rotten? reuters_r8: which of its 8 topics?; files: the prompt as is)",
    )
    max_train_examples: int | None = _f(None, "cap on training examples (after a seeded shuffle); null = all")
    test_examples: int = _f(600, "held-out examples used for the global evaluation")
    partition: str = _f(
        "auto",
        "how examples are split among clients: iid, dirichlet (label skew over class labels), column (by the values of data.partition_column); auto = column when data.partition_column is set, dirichlet when the examples have class labels (classification, the built-in corpora as instructions, instruction/chat files with data.label_column), else iid",
    )
    partition_column: str | None = _f(
        None, "data.partition=column: file column whose values (e.g. a user or source id) each go to one client, dealt over clients by seed"
    )
    dirichlet_alpha: float = _f(1.0, "Dirichlet concentration over labels; smaller = more skewed clients")
    min_examples_per_client: int = _f(16, "dirichlet: resample until every client has at least this many")


@dataclass(kw_only=True)
class TrainConfig:
    """Local training on each client, and the global evaluation."""

    local_steps: int = _f(20, "optimizer steps per client per round")
    batch_size: int = _f(16, "examples per local step")
    lr: float = _f(2e-3, "client learning rate")
    optimizer: str = _f("adamw", "adamw or sgd")
    weight_decay: float = _f(0.0, "client weight decay")
    momentum: float = _f(0.0, "sgd momentum")
    loss: str = _f("prior_calibrated", "cross_entropy, prior_calibrated (logits + log(client label prior) during local training, FedLC-style), or a registered plug-in loss")
    loss_options: dict[str, Any] = _f({}, "options of a plug-in train.loss (its own typed options)")
    max_grad_norm: float | None = _f(1.0, "clip local gradients to this norm; null = no clipping")
    eval_batch_size: int = _f(64, "batch size of the global evaluation")
    eval_every: int = _f(1, "evaluate the global adapter every N rounds (the last round always)")
    keep_optimizer_state: bool = _f(False, "keep each client's optimizer state across rounds (memory grows with clients)")
    personal_dir: str | None = _f(None, "where workers keep clients' personal tensors (fedsa_lora's B factors), one file per client; null = <run_dir>/personal")
    lockstep: bool = _f(
        False,
        "train the clients a worker process gets in one round together: one forward/backward of the shared base per step, each sample through its own client's adapter (multi-LoRA); same result as one after another (to fp32 rounding). Needs LoRA (seq_cls or causal_lm), model.dropout=0 and adapter.dropout=0",
    )
    lockstep_clients: int = _f(
        8,
        "train.lockstep: at most this many clients trained together (a worker asks the coordinator for up to this many tasks at once)",
    )
    device: str = _f(
        "auto",
        "where each training process computes: auto (a GPU when one is visible, else the CPU), cpu, cuda (the process's own GPU: simulate spreads its workers over simulate.devices, torchrun ranks take LOCAL_RANK, Ray actors the GPU Ray gave them), cuda:N or mps; `dpeft worker --device` overrides it on an edge",
    )
    precision: str = _f(
        "fp32",
        "compute precision of local training: fp32, bf16 (torch autocast; the frozen base is stored in bf16, adapters stay fp32 master weights) or fp16 (the same with a gradient scaler); updates on the wire and the exported adapter stay fp32",
    )
    gradient_checkpointing: bool = _f(False, "recompute the base model's layer activations in the backward pass instead of keeping them (less memory, about a third more compute)")
    grad_accum_steps: int = _f(
        1,
        "run each optimizer step's batch (train.batch_size examples) as this many micro-batches whose gradients are summed with their weights: the same step as one batch, with a fraction of the activation memory",
    )
    lr_schedule: str = _f("constant", "learning rate of local steps: constant, linear (decay to 0) or cosine (half cosine to 0), after train.warmup_steps of linear warmup")
    warmup_steps: int = _f(0, "steps of linear learning-rate warmup (counted as train.lr_schedule_scope says)")
    lr_schedule_scope: str = _f(
        "run",
        "what train.lr_schedule spans: run (all rounds: step (round - 1) * local_steps + s of rounds * local_steps, so every client's lr decays across rounds, as centralised fine-tuning would) or round (each client's local steps of one round, warmup and decay again every round)",
    )
    worker_mmap_threshold_kib: int | None = _f(
        None,
        "glibc: a worker process serves allocations of this many KiB and more from their own mmap, returned to the system on free, instead of glibc's growing threshold that keeps freed activations in the heap (default task, tcache off: 1024 gives about 12% less simulate memory for about 7% more time, from page faults; 2048 about 2% less); null = leave glibc's threshold alone",
    )


@dataclass(kw_only=True)
class EvalConfig:
    """How the global adapter is evaluated: on the coordinator's held-out data, and on the clients' own."""

    device: str = _f("auto", "device of the coordinator's evaluation and generation: auto (a GPU when one is visible), cpu, cuda, cuda:N or mps; the model moves there at the first evaluation")
    overlap: bool = _f(True, "the coordinator evaluates (and checkpoints, exports) round r's global in the background while round r+1 trains; each metrics line is still written in order once its round and evaluation are done, and the run waits for its last evaluation (sync and deadline rounds without eval.federated; otherwise evaluation stays sequential)")
    federated: bool = _f(False, "sampled clients also evaluate the global adapter on their own held-out split; the coordinator records the weighted mean (fed_eval_*) and per-client metrics")
    clients: int | None = _f(None, "eval.federated: clients sampled per evaluated round; null = clients_per_round")
    client_test_fraction: float = _f(0.1, "eval.federated: fraction of each client's examples held out for its own evaluation (never trained on)")
    generate: bool | str = _f("auto", "score generations of held-out prompts (causal LMs whose held-out data has reference answers: instruction or chat data): auto (on when it has them), true (an error when it has not) or false")
    generate_examples: int = _f(64, "the first N held-out prompts are generated for and scored at every evaluated round; 0 = none")
    max_new_tokens: int = _f(16, "generation: at most this many new tokens per prompt, greedy (end-of-sequence and padding tokens from the model's generation config)")
    match: str = _f("exact", "generation score: exact (the answer's first line equals the reference, both lowercased with whitespace and trailing punctuation stripped) or contains (the normalised reference appears anywhere in the answer)")
    samples: int = _f(4, "sample generations per evaluated round written to <run_dir>/generations.jsonl (0 = none)")


@dataclass(kw_only=True)
class StrategyConfig:
    """How client updates become the next global adapter."""

    name: str = _f("fedavg", "registered strategy name: fedavg, ...")
    server_lr: float | None = _f(
        None, "step size applied to the aggregated update; null = the strategy's own default (1.0; fedadam, fedyogi, fedadagrad: 0.03)"
    )
    options: dict[str, Any] = _f({}, "options of the named strategy (the strategy.options.* rows)")


@dataclass(kw_only=True)
class SyncConfig:
    """When a round closes."""

    name: str = _f("sync", "sync (wait for every sampled client), deadline (over-select, close at deadline or quorum) or async (FedBuff: buffered asynchronous aggregation); with aggregation=allreduce rounds are synchronous")
    min_workers: int = _f(1, "a round starts only once at least this many workers are connected (a coordinator waiting for its fleet before round 1); fewer for sync.round_timeout_s fails the run")
    round_timeout_s: float = _f(900.0, "fail the run loudly if a round (async: an aggregation step) is not complete after this many seconds")
    task_timeout_s: float | None = _f(None, "a task without a reply after this many seconds is lost: sync re-assigns it (a fresh attempt), deadline/async free its slot; null = never")
    over_selection: float = _f(1.3, "deadline: sample ceil(clients_per_round * this) clients")
    deadline_s: float = _f(60.0, "deadline: close the round this many seconds after it starts (once at least one update arrived)")
    quorum: int | None = _f(None, "deadline: close the round as soon as this many updates arrived; null = clients_per_round")
    late_updates: str = _f("drop", "deadline: drop (reject updates that miss their round) or fold (aggregate them in a later round with a staleness weight)")
    buffer_size: int | None = _f(None, "async: aggregate every K accepted updates; null = clients_per_round")
    concurrency: int | None = _f(None, "async: at most this many tasks in flight at once; null = 2 * clients_per_round")
    max_staleness: int = _f(10, "async and deadline fold: drop updates computed from a global more than this many aggregation steps old")
    staleness: str = _f("polynomial", "weight of a stale update: constant (1), polynomial ((1 + tau)^-a) or hinge (1 if tau <= b, else 1 / (a (tau - b) + 1))")
    staleness_a: float = _f(0.5, "exponent a of polynomial, slope a of hinge")
    staleness_b: float = _f(4.0, "hinge: staleness tolerated at full weight")


@dataclass(kw_only=True)
class SimulateConfig:
    """Local simulation: worker processes on this machine."""

    processes: int = _f(2, "worker processes (each loads the base model once)")
    threads_per_process: int = _f(1, "torch threads in each worker process")
    coordinator_threads: int = _f(2, "torch threads in the coordinator (global evaluation; with simulate.work_conserving it evaluates on its share of simulate.cores instead)")
    work_conserving: bool = _f(True, "the worker processes (and `dpeft ray`'s actors on a local Ray) and the coordinator's evaluation share simulate.cores: before every training step a process claims its fair share of the cores busy processes need, so as a round drains the processes still training take over the idle cores; steps then run on varying thread counts, so a rerun matches to fp32 rounding (AdamW: about 1e-4 of the update) instead of bit for bit (docs/simulation-performance.md)")
    cores: int = _f(0, "the core budget of simulate.work_conserving: threads in use across all worker processes and the coordinator's evaluation never exceed it; 0 = processes x threads_per_process, at most the CPUs this process may use")
    start: str = _f("auto", "how local worker processes start: fork (from the coordinator once it has loaded the base model and data, sharing those pages copy-on-write; Linux, CPU training only), spawn (fresh interpreters running `dpeft worker`), auto (fork on Linux when the workers train on the CPU, else spawn: CUDA cannot be used in a forked child)")
    speed_factors: list[float] = _f([], "simulated slowness, cycled over client ids: a client with factor f replies (f - 1) x its compute time late (the worker trains others meanwhile); [] = all 1")
    dropout: float = _f(0.0, "probability that a task is dropped without a reply (seeded per seed, round, client, attempt)")
    devices: list[str] = _f(
        [],
        "devices of the worker processes, cycled over them (e.g. [cuda:0, cuda:0, cuda:1]: two workers share GPU 0); [] = train.device, where auto and cuda spread the workers round-robin over every visible GPU",
    )
    byzantine_clients: list[int] = _f([], "client ids that send garbage: their update is multiplied by byzantine_scale")
    byzantine_scale: float = _f(-100.0, "factor applied to a byzantine client's update")
    byzantine_random_sign: bool = _f(False, "byzantine updates also get an independent random sign per element")


@dataclass(kw_only=True)
class PrivacyConfig:
    """Differential privacy and secure aggregation of client updates."""

    mode: str = _f(
        "none",
        "none; central (user-level DP-FedAvg: each client's update clipped to privacy.clip_norm, Gaussian noise of noise_multiplier x clip added to the aggregate); local (record-level DP-SGD on each client, per-sample gradients of the adapter clipped and noised)",
    )
    clip_norm: float = _f(1.0, "central: bound on the L2 norm of each client's update (the initial bound with adaptive clipping); local: bound on each example's gradient norm")
    clipping: str = _f("client", "central: where updates are clipped: client (before they leave the worker) or server (the coordinator clips what it receives)")
    adaptive_clipping: bool = _f(False, "central: the clip norm follows privacy.target_quantile of the clients' update norms (Andrew et al. 2021), with its own noise on the clipped counts")
    target_quantile: float = _f(0.5, "adaptive clipping: fraction of updates meant to fall under the clip norm")
    clip_lr: float = _f(0.2, "adaptive clipping: geometric step size of the clip norm per round")
    noise_multiplier: float | None = _f(None, "Gaussian noise standard deviation as a multiple of the clip norm; null = derived from privacy.target_epsilon over the planned rounds (central; local DP-SGD needs it set)")
    delta: float = _f(1e-5, "delta of the (epsilon, delta) guarantee the accountant reports")
    target_epsilon: float | None = _f(None, "privacy budget: derive noise_multiplier for the planned rounds (when it is null), or stop the run cleanly before a round would exceed it")
    accountant: str = _f("rdp", "privacy accountant (Google dp-accounting): rdp (central: with the amplification of the fixed-size client sample) or pld (central: without amplification by sampling, an upper bound)")
    secure_aggregation: bool = _f(False, "SecAgg+: workers mask their (weighted, quantised) updates so the coordinator only learns the sum of the surviving clients' updates")
    secagg_neighbours: int | None = _f(None, "secure aggregation: neighbours each client masks with and shares its secrets among (the graph degree, rounded up to even); null = about 3 log2(clients in the round), all others in small rounds")
    secagg_threshold: float = _f(0.5, "secure aggregation: fraction of a client's neighbours whose shares recover its secrets (at least 2); a round survives up to neighbours - threshold dropouts after masking")
    secagg_bits: int = _f(32, "secure aggregation: masked vectors are residues modulo 2**bits (16..64; up to 32 travel as 4 bytes per entry, more as 8)")
    secagg_clip_range: float = _f(1.0, "secure aggregation: each coordinate of a client's update is clipped to [-range, range] before it is quantised")
    secagg_max_weight: int = _f(10000, "secure aggregation: a client's weight (its example count) is capped at this; with secagg_bits and clients_per_round it sets the quantisation step")


@dataclass(kw_only=True)
class TrackingConfig:
    """Experiment tracking: the per-round metrics, the config and the adapter in TensorBoard and MLflow."""

    tensorboard: bool = _f(False, "write TensorBoard event files of every per-round metric to <run_dir>/tensorboard (needs the tracking extra)")
    mlflow: bool = _f(False, "log every per-round metric (step = round), the resolved config and the final adapter to MLflow (needs the tracking extra)")
    mlflow_uri: str | None = _f(None, "MLflow tracking URI (a server http://host:port, sqlite:///path.db, ...); null = sqlite:///<run_dir>/mlflow.db, artifacts in <run_dir>/mlartifacts")
    experiment: str = _f("dpeft", "MLflow experiment the run is logged under")
    run_name: str | None = _f(None, "MLflow run name and TensorBoard run label; null = the run directory's name")


@dataclass(kw_only=True)
class TransportConfig:
    """Wire settings."""

    chunk_bytes: int = _f(4 * 1024 * 1024, "bytes per streamed chunk, 4096 (4 KiB) to 67108864 (64 MiB) (a worker uploads in chunks no larger than its coordinator's)")
    max_update_bytes: int = _f(1 << 31, "largest update accepted from a worker")
    poll_timeout_s: float = _f(2.0, "how long a worker's task poll waits on the coordinator")
    heartbeat_s: float = _f(5.0, "how often a worker sends a heartbeat while it trains")
    dead_after_s: float = _f(30.0, "a worker not heard from for this long is marked dead and its in-flight tasks are re-queued")
    max_tensor_bytes: int = _f(1 << 31, "largest single tensor accepted in an update")
    max_concurrent_uploads: int = _f(32, "uploads (including interrupted ones kept for resuming) held at once; more are refused with RESOURCE_EXHAUSTED and retried")
    resume_window_s: float = _f(600.0, "how long the received part of an interrupted upload is kept for the worker to resume")
    server_threads: int = _f(64, "coordinator gRPC threads (each waiting task poll holds one; raise for hundreds of workers)")
    max_update_norm: float | None = _f(None, "reject an update whose global L2 norm (over all its tensors, as decoded) exceeds this, with reason 'norm'; null = no bound")
    spool_bytes: int = _f(64 * 1024 * 1024, "uploads and published global adapters at least this large go through a temporary file on the coordinator (memory-mapped tensors), so its memory stays a few chunks above the global and the aggregate")
    spool_dir: str | None = _f(None, "where those temporary files live (unlinked at once, gone with the process); null = <run_dir>/spool")


@dataclass(kw_only=True)
class AuthConfig:
    """Security of `dpeft coordinator` (never sent to workers)."""

    tokens_file: str | None = _f(None, "YAML/JSON file mapping worker id -> bearer token (or sha256:HEX); re-read on change, so tokens are revocable; null = no authentication")
    tls_cert: str | None = _f(None, "PEM certificate (chain) of the coordinator; with tls_key enables TLS")
    tls_key: str | None = _f(None, "PEM private key of the coordinator")
    tls_client_ca: str | None = _f(None, "PEM CA bundle: workers must present a certificate it signed (mutual TLS)")


@dataclass(kw_only=True)
class CodecConfig:
    """Update codecs on the wire, per direction (see dpeft.codec.updates)."""

    up: str = _f("fp32", "codec of worker -> coordinator updates: fp32, fp16, bf16, int8, topk, or a chain such as topk+int8")
    down: str = _f("fp32", "codec of the coordinator -> worker global adapter (a full state, not a delta)")
    options: dict[str, Any] = _f({}, "options of the codecs named in up and down, shared by both directions (the codec.options.* rows)")
    error_feedback: bool = _f(True, "lossy up codec: keep each client's residual (what the codec dropped) on the worker's disk and add it to its next update")
    residual_dir: str | None = _f(None, "where workers keep error-feedback residuals, one file per client; null = <run_dir>/residuals")


@dataclass(kw_only=True)
class RayConfig:
    """`dpeft ray`: where the Ray cluster is and what each worker actor reserves (other commands ignore it)."""

    address: str | None = _f(None, "Ray cluster address; null = RAY_ADDRESS (set by `ray job submit`), or a local Ray when that is unset too")
    actors: int | None = _f(None, "worker actors; null = simulate.processes")
    num_cpus: float = _f(1.0, "CPUs reserved per actor (also its torch threads unless threads is set)")
    num_gpus: float = _f(0.0, "GPUs reserved per actor; fractions share one GPU (0.5 = two actors per GPU)")
    resources: dict[str, Any] = _f({}, "custom resources per actor, e.g. {edge: 1} for nodes started with --resources '{\"edge\": 4}'")
    threads: int | None = _f(None, "torch threads per actor; null = max(1, num_cpus)")
    placement_strategy: str | None = _f("PACK", "placement group strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD; null = no placement group")
    max_restarts: int = _f(2, "times Ray restarts a dead actor (-1 = forever)")
    max_task_retries: int = _f(0, "times Ray itself retries a task on a restarted actor (the transport also re-queues it)")
    max_attempts: int = _f(3, "tries of one task across actor deaths before the sync policy sees it as failed")
    startup_timeout_s: float = _f(600.0, "seconds to wait for the placement group and the actors to come up")
    backend: str | None = _f(None, "allreduce mode: gloo or nccl; null = nccl when actors have GPUs, else gloo")
    local_num_cpus: int | None = _f(None, "CPUs of a local Ray started by `dpeft ray`; null = all")
    runtime_env: dict[str, Any] = _f({}, "extra ray.init runtime_env (e.g. env_vars, pip); working_dir comes from `ray job submit`")


@dataclass(kw_only=True)
class KillReviveConfig:
    """Kill-and-Revive: skip the LoRA modules whose factors change least."""

    enabled: bool = _f(False, "turn Kill-and-Revive on (off = every module active: 'no KR')")
    budget: float = _f(0.5, "active budget: fraction of LoRA modules kept active after a kill, k = max(1, round(budget * modules))")
    window: int = _f(10, "steps per scoring window; a module is scored over each window it was active for all of (see split.kr.score)")
    warmup: int = _f(10, "steps with every module active before the first kill (rounded up to a window boundary)")
    revive_every: int = _f(50, "revive killed modules every this many steps (a multiple of window; 0 = never)")
    revive_count: int = _f(0, "killed modules revived at each revive point (0 = all of them); revived modules train one window, then compete again")
    revive_order: str = _f("score", "which killed modules revive_count picks: score (highest running score first) or oldest (killed longest ago first)")
    score: str = _f(
        "change",
        "window score: change (L2 norm of the change of (A, B) over the window, the paper's), relative (that change / the norm at the window's start) "
        "or loss_drop (sum over the window of -gradient . update of the module: the first-order loss decrease its updates bought)",
    )
    ema: float = _f(0.0, "running score = ema * previous + (1 - ema) * window score, in [0, 1) (0 = the last window only)")


@dataclass(kw_only=True)
class SplitConfig:
    """`dpeft split`: cloud/edge split training (DLoRA); other commands ignore it."""

    edges: int = _f(2, "edges (clients) of a federated run, each round trains clients_per_round of them; simulate: edge processes, each with its own data shard")
    steps: int = _f(100, "edge training steps when the cloud runs no federation (rounds are taken from the run config otherwise)")
    federated: bool = _f(True, "aggregate the edges' adapters every round with strategy.name (false: each edge trains alone for `steps` steps)")
    wire_dtype: str = _f("fp32", "dtype of activations and gradients on the wire: fp32, fp16 or bf16")
    chunk_bytes: int = _f(4 * 1024 * 1024, "largest payload piece per gRPC message, 4096 (4 KiB) to 67108864 (64 MiB)")
    cloud_threads: int = _f(2, "torch threads of the cloud process")
    edge_threads: int = _f(1, "torch threads of each edge process")
    cloud_device: str = _f("auto", "device of the cloud's frozen base: auto (a GPU when one is visible), cpu, cuda, cuda:N or mps")
    edge_device: str = _f("cpu", "device of each edge's embeddings, adapter and head: cpu, auto, cuda, cuda:N or mps")
    eval_examples: int = _f(200, "held-out examples the first edge evaluates through the cloud after each round (0 = no evaluation)")
    layers: int | None = _f(None, "keep only the first N transformer layers of the base (tests, quick runs); null = all")
    token: str = _f("", "shared bearer token edges must present (empty = none)")
    max_batch_edges: int = _f(
        1, "most edges whose concurrent steps the cloud stacks into one pass of its base (each edge still gets only its own rows); 1 = every step runs alone"
    )
    batch_window_ms: float = _f(5.0, "how long the cloud waits for more edges' steps before it runs a batch (it runs at once when every connected edge's step is in)")
    kr: KillReviveConfig = field(default_factory=KillReviveConfig, metadata={"help": "Kill-and-Revive"})


@dataclass(kw_only=True)
class RunConfig:
    """A whole run. Top-level keys are the most common knobs."""

    seed: int = _f(0, "seed of sampling, partitioning, initialisation and local shuffles")
    rounds: int = _f(10, "federated rounds")
    clients: int = _f(10, "number of (virtual) clients the data is split into")
    clients_per_round: int = _f(4, "clients sampled each round")
    run_dir: str = _f("runs/default", "output directory (metrics.jsonl, adapter/, checkpoints/, config.yaml)")
    aggregation: str = _f(
        "coordinator",
        "where client updates meet: coordinator (a coordinator aggregates each round under the sync policy; workers over gRPC or as Ray actors) "
        "or allreduce (the workers sum their updates by torch.distributed all-reduce: synchronous rounds, no coordinator; dpeft simulate, dpeft ray or torchrun)",
    )
    plugins: list[str] = _f([], "plug-in modules to import (they register strategies, sync policies, codecs, dataset loaders, losses); workers import them too")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "base model"})
    adapter: AdapterConfig = field(default_factory=AdapterConfig, metadata={"help": "PEFT adapter"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data and partitioning"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "local training"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation"})
    strategy: StrategyConfig = field(default_factory=StrategyConfig, metadata={"help": "aggregation"})
    sync: SyncConfig = field(default_factory=SyncConfig, metadata={"help": "round closing"})
    simulate: SimulateConfig = field(default_factory=SimulateConfig, metadata={"help": "simulation"})
    transport: TransportConfig = field(default_factory=TransportConfig, metadata={"help": "wire"})
    auth: AuthConfig = field(default_factory=AuthConfig, metadata={"help": "TLS and worker tokens"})
    codec: CodecConfig = field(default_factory=CodecConfig, metadata={"help": "update codecs"})
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig, metadata={"help": "differential privacy and secure aggregation"})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"help": "experiment tracking (TensorBoard, MLflow)"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "`dpeft ray` cluster and actors"})
    split: SplitConfig = field(default_factory=SplitConfig, metadata={"help": "`dpeft split` cloud/edge training"})
