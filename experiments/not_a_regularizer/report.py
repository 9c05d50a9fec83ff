"""The circulation experiment's printed summary."""


def print_summary(results):
    print(results["loss"])
    print(results["field"])
    header = "".join(f"{'K=' + str(k):>15}" for k in results["ks"])
    print(f"{'depth':>5} {'circle':<14}{header}{'Stokes':>15}")
    for name, values in results["depth_1"].items():
        print(f"{1:>5} {name:<14}" + "".join(f"{v:>15.3e}" for v in values))
    for depth, per_circle in results["depths"].items():
        for name, entry in per_circle.items():
            print(
                f"{depth:>5} {name:<14}"
                + "".join(f"{v:>15.9f}" for v in entry["circulation"])
                + f"{entry['stokes']:>15.9f}"
            )
