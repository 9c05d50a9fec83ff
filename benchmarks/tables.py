"""The benchmarks' results as Markdown tables: `format_tables` writes one table per section found
in a results dict, from `benchmarks.run` and from its `--backend` mode alike."""

import math

from benchmarks.timing import load_sentence


def _rate(steps_per_second):
    """Steps per second to 3 significant digits, without an exponent."""
    decimals = 2 - math.floor(math.log10(steps_per_second))
    return f"{round(steps_per_second, decimals):,.{max(decimals, 0)}f}"


def _header(results):
    machine = results["machine"]
    return [
        f"{results['date']}, Keras {machine['keras']} on {machine['backend']} {machine['version']}, "
        f"devices {', '.join(machine['devices'])}, {machine['cpus']} CPUs "
        f"({machine['processor'] or machine['platform']}); " + load_sentence(results, machine["cpus"]),
    ]


def _fullbatch(fullbatch):
    lines = [
        f"Full batch, gas sensor {fullbatch['examples']} x {fullbatch['features']}, l{fullbatch['p']}, "
        f"one output (steps/s; a grid step trains all {fullbatch['grid']['grid']} points; Keras "
        f"jit_compile={fullbatch['keras_jit_compile']}):",
        "",
        "| method | 1 rate: steps/s | x naive fit | x of bound | grid: steps/s | x naive fit | x of bound |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    grids = (fullbatch["single"], fullbatch["grid"])
    for method, label in fullbatch["labels"].items():
        cells = [
            f"{_rate(1 / g['methods'][method]['seconds_per_step'])} | "
            f"{g['ratios'][method]['vs_keras_fit']:,.0f}x | {g['ratios'][method]['of_bound']:.2f}"
            for g in grids
        ]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    for key, label in (
        ("bound_seconds_per_step", "bound: FLOPs at the data matmuls' rate"),
        ("peak_bound_seconds_per_step", "bound: FLOPs at peak matmul rate"),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{_rate(1 / g[key])} | | " for g in grids) + " |")
    return lines + [
        "",
        f"Data matmuls alone: {grids[0]['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (1 rate), "
        f"{grids[1]['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (grid); peak "
        f"({fullbatch['peak_matmul']['size']}^2 matmul) {fullbatch['peak_matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s.",
    ]


def _cnn(layer, title):
    lines = [
        f"{title}, batch {layer['batch']} (ms; jit_compile={layer['jit_compile']}; x plain: against the plain CNN "
        "with the same objective):",
        "",
        "| model | parameters | train step | x plain | inference | x plain | first train call (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, model in layer["models"].items():
        ratio = layer["ratios"][name]
        lines.append(
            f"| {name} | {model['parameters']:,} | {1e3 * model['train']['seconds_per_step']:.2f} | "
            f"{ratio['train_time_vs_plain']:.2f} | {1e3 * model['predict']['seconds_per_step']:.2f} | "
            f"{ratio['predict_time_vs_plain']:.2f} | {model['train']['first_call_s']:.1f} |"
        )
    end_to_end = layer["ratios"].get("plain, EndToEnd optimizer", {}).get("train_time_vs_overparameterized")
    if end_to_end is not None:
        lines += ["", f"The `EndToEnd` optimizer's train step is {end_to_end:.2f}x the twin's."]
    return lines


def _method(rules):
    """How the exact direction of a kernel was computed (eq. 27 for a single output)."""
    if min(rules["shape"]) == 1:
        return "eq. 27"
    return "Newton-Schulz" if rules["newton_schulz"] else "eigh"


def _update_rule(update_rule):
    lines = [
        f"Update rule, depth {update_rule['depth']}: eq. 24 direction in `W^T G` matmuls of the same kernel "
        "(a whole step each, compiled loop):",
        "",
        "| kernel | SGD step (us) | eq. 24 step (us) | x SGD | exact (matmuls) | between refreshes (matmuls) | "
        f"refresh step (matmuls) | refresh_every={update_rule['refresh_every']}, average (matmuls) | exact by | "
        "Gram + eigh alone (matmuls) | floor: Gram, eigh, W V, R; G R, B^T G, B (m B^T G) (matmuls) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for key, rules in update_rule["kernels"].items():
        lines.append(
            f"| {key} | {1e6 * rules['sgd']['seconds_per_step']:,.1f} | {1e6 * rules['exact']['seconds_per_step']:,.1f} | "
            f"{rules['exact_vs_sgd']:.1f}x | {rules['exact_in_matmuls']:.1f} | {rules['between_refreshes_in_matmuls']:.1f} | "
            f"{rules['refresh_in_matmuls']:.1f} | {rules['amortised_in_matmuls']:.1f} | {_method(rules)} | "
            f"{rules['gram_eigh_in_matmuls']:.1f} | "
            + (f"{rules['floor_in_matmuls']:.1f} |" if "floor_in_matmuls" in rules else "- |")
        )
    return lines


def _ratio(value, suffix="x"):
    return "-" if value is None else f"{value:.2f}{suffix}"


def _side_by_side(section):
    lines = [
        f"Optimizers side by side, depth {section['depth']} (`train_on_batch`, random data; x SGD: median step over "
        "SGD's in the same run; floor: SGD's step plus the end-to-end products alone, over SGD's; extra / floor: "
        "(step - SGD) over the products alone; p95 / median of single steps):",
        "",
        "| model, input, batch | optimizer | step (ms) | x SGD | floor, x SGD | extra / floor | p95 / median | "
        "max / median |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, model in section["models"].items():
        shape = "x".join(map(str, model["input_shape"][:2]))
        for optimizer, row in model["optimizers"].items():
            lines.append(
                f"| {name}, {shape}, {model['batch']} | {optimizer}{'' if row['finite'] else ' (diverged)'} | "
                f"{1e3 * row['seconds_per_step']:.1f} | {row['vs_sgd']:.2f}x | {_ratio(row.get('floor_vs_sgd'))} | "
                f"{_ratio(row.get('extra_over_floor'))} | {row['p95_over_median']:.2f} | {row['max_over_median']:.2f} |"
            )
    lines += [
        "",
        "| model | selected kernels | apply products (G multiply-adds) | crossover: batch where "
        "amortised costs at most the target x SGD | batches tried (x SGD) |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for name, model in section["models"].items():
        search = model["crossover"]
        found = f"{search['batch']}" if search["batch"] is not None else f"> {search['tried'][-1]['batch']}"
        tried = ", ".join(f"{t['batch']}: {t['vs_sgd']:.2f}x" for t in search["tried"])
        lines.append(
            f"| {name} | {model['selected_kernels']} | {model['apply_multiply_adds'] / 1e9:.3g} | "
            f"{found} ({search['optimizer']}, {search['target_ratio']}x) | {tried} |"
        )
    conversion = section.get("conversion")
    if conversion is not None:
        lines += [
            "",
            f"Conversion of {conversion['model']}: `overparameterize(preserve_function=True)` "
            f"{conversion['overparameterize']['median_s']:.2f} s, `keras.models.clone_model` "
            f"{conversion['clone_model']['median_s']:.2f} s: {conversion['overparameterize_vs_clone_model']:.1f}x.",
        ]
    return lines


def _direction(direction):
    lines = [
        f"End-to-end direction, depth {direction['depth']}, float32, one step in a compiled loop (us):",
        "",
        "| kernel | W^T G matmul | eq. 24 step | x matmul |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, cases in direction["kernels"].items():
        lines.append(
            f"| {key} | {1e6 * cases['matmul']['seconds_per_step']:,.1f} | "
            f"{1e6 * cases['end_to_end']['seconds_per_step']:,.1f} | {cases['direction_vs_matmul']:.1f} |"
        )
    return lines


def _precision(precision):
    lines = [
        f"Accuracy of the float32 direction against a float64 SVD evaluation (relative Frobenius error), by matmul "
        f"precision; condition number {precision['condition']:g}:",
        "",
        "| kernel | depth | " + " | ".join(precision["precisions"]) + " |",
        "| --- | ---: |" + " ---: |" * len(precision["precisions"]),
    ]
    for row in precision["rows"]:
        errors = " | ".join(f"{row['errors'][p]:.2e}" for p in precision["precisions"])
        lines.append(f"| {row['kernel']} | {row['depth']} | {errors} |")
    lines += [
        "",
        "The eq. 24 step in `W^T G` matmuls (each timed under the same precision), by matmul precision:",
        "",
        "| kernel | " + " | ".join(precision["precisions"]) + " |",
        "| --- |" + " ---: |" * len(precision["precisions"]),
    ]
    for kernel in precision["cost"][precision["precisions"][0]]["kernels"]:
        cells = " | ".join(
            f"{precision['cost'][p]['kernels'][kernel]['direction_vs_matmul']:.1f}" for p in precision["precisions"]
        )
        lines.append(f"| {kernel} | {cells} |")
    return lines


def _ns_threshold(section):
    lines = [
        f"Newton-Schulz against the eigh, depth {section['depth']}: the preconditioner of each group of selected "
        "kernels of one matrix shape (oriented tall), batched as `EndToEnd` does, one compiled call (ms; NS / eigh: "
        f'the medians\' quotient; auto: what method="auto" runs here, Newton-Schulz tried from '
        f"{section['auto_min_columns']} columns on an accelerator"
        + ("" if section.get("auto_tries_newton_schulz_here", True) else ", the eigh on this CPU")
        + "):",
        "",
        "| model | rows x cols | group size | eigh (ms) | Newton-Schulz (ms) | NS / eigh | NS converged | auto |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, model in section["models"].items():
        for g in model["groups"]:
            lines.append(
                f"| {name} | {g['rows']} x {g['cols']} | {g['group_size']} | {1e3 * g['eigh_s']:.3f} | "
                f"{1e3 * g['newton_schulz_s']:.3f} | {g['newton_schulz_over_eigh']:.2f} | "
                f"{'yes' if g['converged'] else 'no'} | {g['auto_method']} |"
            )
    smallest, from_on = section["smallest_faster_columns"], section["faster_from_columns"]
    if smallest is None:
        summary = "Newton-Schulz was faster on no group."
    else:
        summary = f"Newton-Schulz was faster on a group of {smallest} columns at the fewest; " + (
            "it was slower on a group of the most columns."
            if from_on is None
            else f"on every group of {from_on} columns or more."
        )
    return lines + ["", summary]


def _distributed(section):
    counts = [str(r) for r in section["replicas"]]
    lines = [
        f"`tf.distribute.MirroredStrategy` on {counts[1]} logical CPU devices sharing the cores, {section['model']}, "
        f"global batch {section['batch']} (ms per step, `model.train_function`; extra: step minus SGD's step with "
        f"the same replicas; extra ratio: the extra on {counts[1]} replicas over the extra on 1):",
        "",
        "| optimizer | " + " | ".join(f"{r} replica(s): step | x SGD | extra" for r in counts) + " | extra ratio |",
        "| --- |" + " ---: | ---: | ---: |" * len(counts) + " ---: |",
    ]
    for optimizer, steps in section["steps"].items():
        row = section["optimizers"].get(optimizer)
        cells = [
            f"{1e3 * steps[r]:.2f} | "
            + ("1.00x | -" if row is None else f"{row['vs_sgd'][r]:.2f}x | {1e3 * row['extra_s'][r]:.2f}")
            for r in counts
        ]
        ratio = "-" if row is None else f"{row['extra_ratio']:.2f}"
        lines.append(f"| {optimizer} | {' | '.join(cells)} | {ratio} |")
    return lines


SECTION_TABLES = {
    "fullbatch": _fullbatch,
    "layer": lambda layer: _cnn(layer, "MNIST tutorial CNN"),
    "update_rule": _update_rule,
    "side_by_side": _side_by_side,
    "ns_threshold": _ns_threshold,
    "distributed": _distributed,
    "cnn": lambda layer: _cnn(layer, "CNN"),
    "direction": _direction,
    "precision": _precision,
}


def format_tables(results):
    """The results as Markdown tables, one per section present, after a line saying what they
    were measured on."""
    lines = _header(results)
    for name, table in SECTION_TABLES.items():
        if name in results:
            lines += ["", *table(results[name])]
    return "\n".join(lines)
