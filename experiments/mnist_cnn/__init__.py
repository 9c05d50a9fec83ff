"""The paper's MNIST experiment: the TensorFlow tutorial CNN against its overparameterized twins
and the end-to-end rule, over several seeds.

    python -m experiments.mnist_cnn [--manual-dir DIR] [--arms ...] [--seeds ...] [--quick]

Arora, Cohen & Hazan (2018, Section 8) replace each dense weight matrix of the TensorFlow MNIST
tutorial network (tensorflow/models, tutorials/image/mnist/convolutional.py) by a product of
two matrices (about +15% parameters) and report "optimization accelerated by orders of
magnitude" in batch loss. This script trains these arms (`--arms`, default all five) with the
same recipe:

  plain       the tutorial CNN: conv 5x5x32 SAME relu -> max-pool 2 -> conv 5x5x64 SAME relu ->
              max-pool 2 -> flatten (3136) -> dense 512 relu -> dropout 0.5 -> dense 10 (logits).
              Weights truncated normal std 0.1; biases 0 for conv1, 0.1 for the others. Inputs
              scaled as the tutorial does, (x - 127.5) / 255, in [-0.5, 0.5].
  twin        `tf_overparam.overparameterize(depth=2)` of the plain model: 3136->512->512 and
              512->10->10 (hidden width = each layer's output width), the convolutions and all
              biases copied from the plain model of the same seed; each factor drawn like every
              tutorial matrix (truncated normal std 0.1): "simply placing two matrices in
              succession" as the paper describes it. Its end-to-end kernels start larger than
              the plain ones. The L2 penalty is on the end-to-end kernel, so it minimises the
              same function of its end-to-end weights as plain.
  balanced    the twin with a balanced factorisation of the plain kernels
              (`preserve_function=True`): it starts as the same function as plain, so a
              difference in the curves comes from the optimisation geometry alone.
  factors     the twin with the L2 penalty on each factor instead (`factor_regularizer`, the
              paper's eq. 11 weight decay): a different objective, reported as such.
  end_to_end  the plain CNN trained by the end-to-end rule: `tf_overparam.optimizers.EndToEnd(
              inner optimizer, depth=2, variables=["*fc*/kernel"])` preconditions the dense
              kernels' gradients by eq. 24 (docs/equations.md), as the dense twin's factors would
              move them if balanced; everything else gets the plain gradient.
`--overparameterize dense,conv` expands the two convolutions of the twins too (`OverparamConv2D`
channel chains: the 5x5xcin x cout kernel as a product of two matrices, hidden width = filters).

Seeds: plain and twin run every seed of `--seeds` (default 66478, the tutorial's, 66479 and
66480); balanced, factors and end_to_end every seed of `--other-seeds` (default 66478). A seed
sets the weights, the data order and the dropout masks, the same for every arm: one seed's arms
see the same batches in the same order with the same dropout masks, and the twins start from
that seed's plain model. (Each use draws from its own stream of the seed, `stream_seed`.)

- Objective: mean softmax cross-entropy + the tutorial's 5e-4 * sum(tf.nn.l2_loss) over the
  dense weights and biases, i.e. keras `L2(2.5e-4)` (L2(l) = l * sum(w^2)).
- Optimizer: the tutorial's momentum 0.9 (Keras SGD momentum; TF1's MomentumOptimizer differs
  only in when a changed learning rate enters the velocity), learning rate 0.01 decayed x0.95
  per epoch (staircase), batch 64, 10 epochs; `--optimizer sgd` (plain, lr 0.01) or
  `adam` (lr 0.001) as options (end_to_end wraps the same optimizer).
- Data: tfds MNIST; like the tutorial, 5000 training images are held out for validation
  (tfds' `train[:5000]`), 55000 train (859 full batches per epoch, 8590 steps in 10 epochs),
  the 10000 test images are only evaluated at the end.

Reported, separately: the batch cross-entropy (the headline) and the penalty (batch loss minus
cross-entropy, each arm its own penalty). "Batch" values are each training batch's at the
weights before its step, as the tutorial prints its "Minibatch loss". Steps to a threshold: the
first step n from which the mean cross-entropy of the last `Config.window` (50) batches stays
<= the threshold at every later step (a sustained crossing; the first crossing is kept too).
The thresholds are fixed here, before any run: 1.0, 0.3, 0.1, 0.05 and 0.03 (`Config.thresholds`).
Tables give the median over seeds and the [min, max]; a speedup is plain's median steps over
the arm's, with the [min, max] of the per-seed ratios (seed s against seed s) beside it.

A run folder (`--out`, default runs/mnist_cnn/<UTC time>) holds config.json (the options, with
the package version and git commit), and per arm and seed, as each finishes,
`arms/<arm>/seed_<s>.json` (its per-batch curves and results) and `seed_<s>.weights.h5` (the
trained weights without optimizer state); after every model, results.json (the tables over every
finished arm and seed) and batch_loss.png (median and band over seeds) are rewritten. A twin's
collapsed model is checked (it predicts as the twin, also after saving and loading) and not
kept: `tf_overparam.collapse` of the twin rebuilt from its weights gives it again. TensorBoard
logs (`tensorboard --logdir <run>/tensorboard`): per arm and seed `train`/`validation` per
epoch, `batch` every batch, for the twins `overparam`: balancedness, end-to-end singular values,
effective learning rate (factor histograms only with --histograms). `--resume <run>` keeps the
finished arms and seeds and trains the rest; it may add arms and seeds, so a set can be
completed over several sittings.

The run prints its estimated time at the start; --help's --quick line gives the full run's.
"""

from experiments._package_exports import lazy_exports
from experiments.data.mnist_files import ENV_VAR as MNIST_ENV_VAR  # noqa: F401 - for the command line
from experiments.data.mnist_files import NUM_TRAIN  # noqa: F401

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "cli": ("build_parser", "main", "parse_args"),
        "protocol": (
            "ARMS",
            "BASELINE",
            "COLLAPSE_RTOL",
            "Config",
            "DEFAULT_LEARNING_RATES",
            "END_TO_END_DEPTH",
            "END_TO_END_VARIABLES",
            "EXPANDABLE",
            "OPTIMIZERS",
            "SEEDED_ARMS",
            "STREAMS",
            "estimate_seconds",
            "stream_seed",
        ),
        "curves": ("batch_penalty", "batch_values_from_running_means", "running_mean", "steps_to_threshold"),
        "models": ("build_arm", "build_cnn", "build_twin", "compile_model", "make_optimizer"),
        "recording": ("BatchCrossEntropy", "BatchRecorder"),
        "training": ("check_collapse", "load_data", "make_strategy", "train_and_save", "train_batches", "train_one"),
        "run_state": ("RunState", "load_finished", "model_files"),
        "report": ("over_seeds", "print_summary", "summarize"),
        "plots": ("batch_loss_figure", "save_batch_loss_figure"),
    },
)
