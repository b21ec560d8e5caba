"""Reproduction experiments of the target-propagation family: B18's MNIST networks, every
target-propagation variant under both schedules beside backprop, FA and DFA
(docs/algorithms/published_results.md §7.4; docs/algorithms/target_propagation.md §4).

Published numbers are B18's test errors in percent: the best test error within 500 epochs
after a 60-configuration random search (test-set selection, docs/algorithms/pitfalls.md §8.11).
The results table gives bpdl's test error at the best validation epoch (honest) and the
test-selected minimum (B18's protocol) side by side.
"""

from __future__ import annotations

from typing import Any

from bpdl.experiments import Experiment, ExperimentRun, register

_B18_FC = {"hidden": [256] * 5, "activation": "tanh", "init": "xavier_uniform", "bias_init": 0.0}

#: B18 Table 1, MNIST test error (%): (FC parallel, FC alternating, LC parallel, LC alternating)
_PUBLISHED = {
    "dtp": (2.86, 1.83, 1.52, 1.46),
    "sdtp": (3.52, 2.28, 1.98, 1.90),
    "aosdtp": (2.93, 1.86, 1.92, 1.91),
    "tp": (None, None, None, None),  # B18 reports no plain TP on MNIST
}
_BASELINES = {"fc": {"bp": 1.48, "fa": 1.85, "dfa": 2.75}, "lc": {"bp": 1.17, "fa": 1.26,
                                                                 "dfa": 2.05}}

#: bpdl's hyperparameters per rule (both schedules, both networks). B18's chosen values (its
#: Table 5) are not reproduced in docs/ (§4.3), so these are the best configurations of bpdl's
#: B18-style random search (30 configurations of B18's ranges per rule and schedule, MNIST FC,
#: 4 epochs on 5,000 examples per fold; benchmarks/results/studies/tp_random_search.db, study
#: dtp-parallel-mnist-fc trial 26 and sdtp-parallel-mnist-fc trial 15, the best under both
#: schedules), rounded to two or three digits. tp reuses DTP's and aosdtp SDTP's.
_DTP = {"lr": 2.9e-4, "optimizer_options": {"betas": [0.9, 0.999], "eps": 1e-6},
        "rule_options": {"alpha": 0.167, "sigma": 0.115, "inverse_lr": 4.2e-5,
                         "inverse_optimizer_options": {"betas": [0.9, 0.99], "eps": 1e-8}}}
_SDTP = {"lr": 2.9e-4, "optimizer_options": {"betas": [0.9, 0.99], "eps": 1e-8},
         "rule_options": {"sigma": 0.064, "inverse_lr": 1.7e-4,
                          "inverse_optimizer_options": {"betas": [0.9, 0.999], "eps": 1e-6}}}
_SETTINGS: dict[str, dict[str, Any]] = {"tp": _DTP, "dtp": _DTP, "sdtp": _SDTP,
                                        "aosdtp": {**_SDTP, "rule_options": {
                                            **_SDTP["rule_options"], "aux_size": 512}}}

#: Settings chosen on validation accuracy for one (network, rule, schedule) where the search's
#: (4 epochs) did not carry over to 100 epochs; each replaces the keys it names
#: (benchmarks/RESULTS.md, "B18's MNIST networks"). SDTP parallel on the FC net: 15-epoch probes
#: at forward rates 2.9e-4, 1e-3 and 3e-3 reached validation accuracy 0.933, 0.938 and 0.943.
#: SDTP alternating: every forward rate above the search's (1e-3 and 3e-3, each with inverse
#: rates 1.7e-4, 1e-3 and 3e-3, 20 epochs) was less stable and lower on validation; DTP's
#: search configuration (its Adam settings, sigma and inverse rate) reached 0.950 against the
#: SDTP configuration's 0.945 over 100 epochs, and 0.951 with sigma 0.25. AO-SDTP alternating
#: (100 epochs): SDTP's configuration 0.972, DTP's 0.970, forward rate 1e-4 0.964, sigma 0.2
#: 0.973, sigma 0.3 0.972.
_OVERRIDES: dict[tuple[str, str, str], dict[str, Any]] = {
    ("fc", "sdtp", "parallel"): {"lr": 3e-3},
    ("fc", "sdtp", "alternating"): {  # DTP's configuration without alpha (SDTP has none)
        **_DTP, "rule_options": {**{k: v for k, v in _DTP["rule_options"].items() if k != "alpha"},
                                 "sigma": 0.25}},
    ("fc", "aosdtp", "alternating"): {
        "rule_options": {**_SETTINGS["aosdtp"]["rule_options"], "sigma": 0.2}},
}


def _tp_runs(network: str) -> tuple[ExperimentRun, ...]:
    offset = 0 if network == "fc" else 2
    runs = []
    for rule, published in _PUBLISHED.items():
        for i, schedule in enumerate(("parallel", "alternating")):
            settings = {**_SETTINGS[rule], **_OVERRIDES.get((network, rule, schedule), {})}
            runs.append(ExperimentRun(
                f"{rule}-{schedule}",
                {"rule": rule, "lr": settings["lr"],
                 "optimizer_options": settings["optimizer_options"],
                 "rule_options": {**settings["rule_options"], "schedule": schedule}},
                published[offset + i]))
    for rule, published in _BASELINES[network].items():
        runs.append(ExperimentRun(rule, {"rule": rule, "lr": 1e-3}, published))
    # as bartunov2018_mnist_fc: FA at 1e-3 peaks early and degrades; 1e-4 is its validated rate
    runs.append(ExperimentRun("fa-lr1e-4", {"rule": "fa", "lr": 1e-4}, _BASELINES[network]["fa"]))
    return tuple(runs)


_PROTOCOL = (
    "tanh units, Glorot-uniform weights, zero biases, softmax cross-entropy, batch 100, 5,000 "
    "training images held out for validation, test error at every epoch. Target propagation "
    "(docs/algorithms/target_propagation.md §4): the output layer on the task loss, the hidden "
    "layers on squared distances to their targets, the inverses with their own Adam; "
    "'parallel' steps both on every minibatch, 'alternating' makes one pass training the "
    "inverses and one training the forward weights per epoch (both passes are logged; an "
    "epoch here is both). B18 trained up to 500 epochs after a 60-configuration random search "
    "and reports the best test error reached; its chosen hyperparameters are not reproduced "
    "here (docs/algorithms/target_propagation.md §4.3), so bpdl's come from its own B18-style "
    "random search on validation accuracy (4 epochs, FC; the LC runs reuse them), with SDTP's FC "
    "runs and AO-SDTP's alternating FC run re-chosen on validation over 15-100 epochs. Default "
    "100 epochs (B18: up to 500; --epochs 500 to match). "
    "Baselines as in bartunov2018_mnist_fc / _lc: Adam lr 1e-3, and FA at 1e-4.")

register(Experiment(
    name="bartunov2018_tp_mnist_fc",
    title="Bartunov et al. 2018: MNIST fully connected 5x256 tanh, target propagation (TP, DTP, "
          "SDTP, AO-SDTP; parallel and alternating) beside BP / FA / DFA "
          "(docs/algorithms/published_results.md §7.4)",
    source="Bartunov, Santoro, Richards, Marris, Hinton & Lillicrap (2018), NeurIPS 31, Table 1",
    protocol=_PROTOCOL,
    common={"dataset": "mnist", "model": "mlp", "model_options": _B18_FC, "optimizer": "adam",
            "batch_size": 100, "epochs": 100, "val_size": 5000, "test": "every", "seed": 0},
    runs=_tp_runs("fc"),
    notes=("Published: B18's best test error within 500 epochs (test-selected); compare it with "
           "the 'best test error (test-selected)' column, and read the honest number in the "
           "'test error at best val' column."),
))

register(Experiment(
    name="bartunov2018_tp_mnist_lc",
    title="Bartunov et al. 2018: MNIST locally connected network, target propagation (TP, DTP, "
          "SDTP, AO-SDTP; parallel and alternating) beside BP / FA / DFA "
          "(docs/algorithms/published_results.md §7.4)",
    source="Bartunov et al. (2018), NeurIPS 31, Table 1",
    protocol=("LC (3x3, 32, stride 2) -> LC (3x3, 64, stride 2) -> FC 1024 -> softmax 10, "
              "TensorFlow SAME padding and per-location biases (neither stated in B18); the "
              "inverses of the LC layers are transposed locally connected maps "
              "(docs/algorithms/baselines.md §2.3). " + _PROTOCOL),
    common={"dataset": "mnist", "model": "lc", "optimizer": "adam", "batch_size": 100,
            "epochs": 100, "val_size": 5000, "test": "every", "seed": 0},
    runs=_tp_runs("lc"),
    notes=("Published: B18's best test error within 500 epochs (test-selected). The LC runs "
           "cost minutes per epoch on a CPU; `--epochs` shortens them."),
))

# ---- Meulemans et al. 2020 (M20), DDTP-linear on MNIST ----------------------------------------------

register(Experiment(
    name="meulemans2020_ddtp_mnist",
    title="Meulemans et al. 2020: MNIST 5x256 tanh, DDTP-linear (difference reconstruction loss) "
          "beside DTP and BP (docs/algorithms/target_propagation.md §4.5)",
    source="Meulemans, Carzaniga, Suykens, Sacramento & Grewe (2020), NeurIPS 33 "
           "(arXiv:2006.14331), Table 1",
    protocol=(
        "5 x 256 tanh, softmax cross-entropy, Adam for forward and feedback weights, batch 128, "
        "100 epochs, 5,000 training images for validation, the test error at the epoch of the "
        "best validation error (M20: mean of 10 seeds; bpdl: one). ddtp uses the values of "
        "M20's public DDTP-linear MNIST configuration translated to bpdl's options: M20 divide "
        "the forward rate by the output target's step (2.04e-5 / 0.061 = 3.3e-4), feedback "
        "Adam lr 1.64e-4 with betas (0.999, 0.999) and eps 2.8e-4, sigma 0.091, alpha 0.061; "
        "M20's 6 feedback pre-training epochs and its feedback weight decay are not "
        "implemented (docs/algorithms/target_propagation.md §4.5). dtp uses bpdl's B18-search "
        "configuration. M20's published test errors have not been checked against the paper "
        "for bpdl's docs, so none are shown."),
    common={"dataset": "mnist", "model": "mlp", "model_options": _B18_FC, "optimizer": "adam",
            "batch_size": 128, "epochs": 100, "val_size": 5000, "test": "every", "seed": 0},
    runs=(
        ExperimentRun("ddtp", {"rule": "ddtp", "lr": 3.3e-4, "optimizer_options": {
            "betas": [0.9, 0.999], "eps": 1.26e-8}, "rule_options": {
            "alpha": 0.061, "sigma": 0.091, "inverse_lr": 1.64e-4,
            "inverse_optimizer_options": {"betas": [0.999, 0.999], "eps": 2.8e-4}}}),
        ExperimentRun("dtp", {"rule": "dtp", "lr": _DTP["lr"],
                              "optimizer_options": _DTP["optimizer_options"],
                              "rule_options": _DTP["rule_options"]}),
        ExperimentRun("bp", {"rule": "bp", "lr": 1e-3}),
    ),
))
