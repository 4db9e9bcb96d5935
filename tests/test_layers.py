"""No import runs back up the layers: a module imports only from the layers below its own (or
from its own package), so the math a student reads never depends on the machinery that drives
it. Every module of the project has its place here; a new one must be given one."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYERS = [  # lowest first
    {"engine", "stats", "data"},                       # the optimizers' machinery; statistics; data
    {"optim", "per_example"},                          # the optimizers' math; per-example gradients
    {"cli", "plots", "memory"},                        # the command line; figures; memory
    {"parallel", "compare"},                           # processes: torchrun ranks, compare mode
    {"train_helpers"},                                 # plain helpers inside a run
    {"nanogpt_sai", "vit_sai"},                        # the trainers
    {"iso_memory"},                                    # a study's plan: builds the trainers' models
    {"sweep", "snr", "bench"},                         # studies and benchmarks of the trainers
    {"tools"},                                         # scripts over all of it
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def project_modules():
    """{file: its top-level unit (a module, or a package: data, engine, plots, tools)}."""
    units = {}
    for folder, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT)
        dirs[:] = [d for d in dirs if rel == "." and d in ("data", "engine", "plots", "tools")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                units[path] = name[:-3] if rel == "." else rel
    return units


def imported_units(path, known):
    """The project units a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module
                 and node.level == 0 else [])
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in known}
    return found


def test_every_import_runs_down_the_layers():
    units = project_modules()
    known = set(units.values())
    assert known <= set(LAYER), f"modules without a layer: {sorted(known - set(LAYER))}"
    against = []
    for path, unit in sorted(units.items()):
        for other in imported_units(path, known) - {unit}:
            if LAYER[other] >= LAYER[unit]:
                against.append(f"{os.path.relpath(path, ROOT)} imports {other}")
    assert against == []


def test_the_check_sees_an_import_against_the_layers(tmp_path):
    """The parse finds imports inside functions too (where a back-up import hides)."""
    path = tmp_path / "m.py"
    path.write_text("import os\nfrom plots.figures import draw_all\n\n\ndef f():\n"
                    "    from nanogpt_sai import GPT\n    import cli\n")
    assert imported_units(str(path), set(LAYER)) == {"plots", "nanogpt_sai", "cli"}
