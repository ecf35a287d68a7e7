"""The empirical model of large-batch training fitted to measured steps (McCandlish, Kaplan, Amodei et al. 2018):
a target is reached in S = S_min (1 + B_crit / B) steps of batch B, that is E = E_min (1 + B / B_crit) examples
with E_min = S_min B_crit. Fitted to each batch size's steps to the target by least squares on log S (the
points span orders of magnitude); report.py draws and tabulates it against the measured noise scale."""
import math

import numpy as np


def fit(batches: list[float], steps: list[float]) -> dict:
    """S_min and B_crit minimising the squared error of log S over the points: for each B_crit on a fine
    logarithmic grid, log S_min is the mean of log S - log(1 + B_crit / B) (exact for that B_crit); the best
    B_crit on the grid is then refined on a finer grid around it. Needs two points or more."""
    b, s = np.asarray(batches, float), np.log(np.asarray(steps, float))

    def best_on(grid):
        shifts = np.log1p(grid[:, None] / b[None, :])  # (grid, points)
        log_minimum = (s[None, :] - shifts).mean(axis=1)
        errors = ((s[None, :] - shifts - log_minimum[:, None]) ** 2).sum(axis=1)
        i = int(np.argmin(errors))
        return grid[i], math.exp(log_minimum[i]), float(errors[i])
    coarse = best_on(np.logspace(-2, 7, 901))[0]
    critical, minimum, error = best_on(np.logspace(math.log10(coarse) - 0.02, math.log10(coarse) + 0.02, 401))
    return {"s_min": minimum, "b_crit": float(critical), "e_min": float(minimum * critical),
            "rms_log_error": math.sqrt(error / len(b))}


def steps_at(model: dict, batch: float) -> float:
    return model["s_min"] * (1 + model["b_crit"] / batch)


def draw(path: str, points: dict[str, list[tuple[int, float]]], models: dict[str, dict],
         noise: dict[str, float | None], whole_set: int, whole_set_steps: tuple[str, int, int] | None) -> None:
    """Steps and examples to the target against batch size (log-log) per optimiser: the measured points, the
    fitted curves out to the whole set, B_crit and the measured B_simple (in examples) marked; and the
    whole-set runs' steps where known (a range: they were checked every 100 steps)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"lamb": "tab:blue", "adam": "tab:orange", "sgd": "tab:green", "muon": "tab:purple"}
    figure, (steps_axes, images_axes) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, measured in points.items():
        colour, model = colours.get(name, "tab:gray"), models.get(name)
        sizes = [p[0] for p in measured]
        steps_axes.plot(sizes, [p[1] for p in measured], "o", color=colour, label=f"{name}, measured")
        images_axes.plot(sizes, [p[0] * p[1] for p in measured], "o", color=colour, label=f"{name}, measured")
        if model:
            grid = np.logspace(math.log10(min(sizes) / 2), math.log10(whole_set), 200)
            steps_axes.plot(grid, [steps_at(model, g) for g in grid], "-", color=colour, alpha=0.7,
                            label=f"{name} fit: S_min {model['s_min']:.0f}, B_crit {model['b_crit']:,.0f}")
            images_axes.plot(grid, [steps_at(model, g) * g for g in grid], "-", color=colour, alpha=0.7)
            for axes in (steps_axes, images_axes):
                axes.axvline(model["b_crit"], color=colour, linestyle="--", alpha=0.6)
        if noise.get(name):
            for axes in (steps_axes, images_axes):
                axes.axvline(noise[name], color=colour, linestyle=":", alpha=0.9)
    if whole_set_steps:
        name, low, high = whole_set_steps
        steps_axes.plot([whole_set, whole_set], [low, high], "-", color=colours.get(name, "k"), linewidth=4,
                        alpha=0.5, label=f"{name}, whole set (H100, checked every 100 steps)")
        images_axes.plot([whole_set, whole_set], [low * whole_set, high * whole_set], "-",
                         color=colours.get(name, "k"), linewidth=4, alpha=0.5)
    steps_axes.set(xscale="log", yscale="log", xlabel="batch size (examples)", ylabel="steps to the target",
                   title="steps (dashed: fitted B_crit; dotted: measured B_simple)")
    images_axes.set(xscale="log", yscale="log", xlabel="batch size (examples)", ylabel="examples to the target",
                    title="examples processed")
    for axes in (steps_axes, images_axes):
        axes.grid(alpha=0.3, which="both")
    steps_axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
