"""Fitting a `VerdictRule` on validation slides only (numpy/scipy only).

Cross-validation fits each fold's rule on that fold's validation patients alone: one fold's
validation patients are another fold's test patients, so nothing here pools folds. A patient
(slide) is infected iff any of its crops is labelled parasitized. The choosers read only the
slides a rule would give a verdict: known slide ids ('' is left out) with at least
``min_cells`` crops. Every chooser also measures the crop rates at ``q`` the rule assumes: the
false-positive rate on the crops of uninfected patients, the sensitivity on parasitized crops.
"""

from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from mnres.metrics.cells import _check
from mnres.metrics.intervals import _is_int, wilson_interval
from mnres.metrics.slides import _check_slides, choose_fraction_threshold
from mnres.metrics.verdicts import VerdictRule


def _rate(name, confident, q, confidence):
    """{name: rate, low, high (Wilson), confident, crops, q} of a boolean array of crops."""
    positives, n = int(confident.sum()), int(confident.shape[0])
    low, high = wilson_interval(positives, n, confidence)
    return {
        name: positives / n,
        "low": low,
        "high": high,
        "confident": positives,
        "crops": n,
        "q": float(q),
    }


def _check_q(q):
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")


def false_positive_rate(
    probs: ArrayLike,
    labels: ArrayLike,
    slide_infected: ArrayLike,
    q: float,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The share of uninfected patients' crops with p >= q, with its Wilson interval.

    Measured on the crops of uninfected patients rather than on every crop labelled uninfected:
    a healthy slide is what the rule must not call infected, and an infected patient's
    uninfected crops may differ from a healthy patient's.

    Args:
      probs: float [N], P(parasitized).
      labels: int [N], 1 = parasitized; a crop of an uninfected patient labelled 1 raises.
      slide_infected: bool [N], whether each crop's patient is infected.
      q: a crop is confident iff p >= q.
      confidence: coverage of the interval.

    Returns:
      dict: false_positive_rate, low, high, confident, crops, q.
    """
    labels, probs = _check(labels, probs)
    _check_q(q)
    infected = np.asarray(slide_infected)
    if infected.shape != labels.shape or infected.dtype != bool:
        raise ValueError(f"slide_infected must be bool of shape {labels.shape}")
    if np.any(labels[~infected] == 1):
        raise ValueError("a crop labelled parasitized belongs to a patient given as uninfected")
    if np.all(infected):
        raise ValueError("no crop of an uninfected patient: the false-positive rate is undefined")
    return _rate("false_positive_rate", probs[~infected] >= q, q, confidence)


def crop_sensitivity(
    probs: ArrayLike, labels: ArrayLike, q: float, confidence: float = 0.95
) -> dict[str, Any]:
    """The share of crops labelled parasitized with p >= q, with its Wilson interval.

    Returns:
      dict: sensitivity, low, high, confident, crops, q.
    """
    labels, probs = _check(labels, probs)
    _check_q(q)
    if not np.any(labels == 1):
        raise ValueError("no crop labelled parasitized: the sensitivity is undefined")
    return _rate("sensitivity", probs[labels == 1] >= q, q, confidence)


def _validation_slides(probs, labels, slide_ids, min_cells):
    """(labels, probs, slide index, per-crop infected, per-slide infected) of usable slides."""
    labels, probs, ids = _check_slides(labels, probs, slide_ids)
    if not _is_int(min_cells) or min_cells < 1:
        raise ValueError(f"min_cells must be an integer >= 1, got {min_cells!r}")
    slides, index, cells = np.unique(ids, return_inverse=True, return_counts=True)
    usable = (slides != "") & (cells >= min_cells)
    keep = usable[index]
    if not np.any(keep):
        raise ValueError(f"no validation slide with a known id and >= {min_cells} crops")
    _, index = np.unique(index[keep], return_inverse=True)
    labels, probs = labels[keep], probs[keep]
    slide_infected = np.bincount(index, weights=labels) > 0
    return labels, probs, index, slide_infected[index], slide_infected


def _measured_rule(kind, probs, labels, crop_infected, q, min_cells, **params):
    fpr = false_positive_rate(probs, labels, crop_infected, q)["false_positive_rate"]
    sens = crop_sensitivity(probs, labels, q)["sensitivity"]
    return VerdictRule(kind, sens, fpr, int(min_cells), q=float(q), **params)


def choose_fraction_rule(
    probs: ArrayLike,
    labels: ArrayLike,
    slide_ids: Iterable[str | bytes],
    min_cells: int,
    q: float = 0.5,
) -> VerdictRule:
    """The 'fraction' rule: threshold by `mnres.metrics.slides.choose_fraction_threshold`.

    Its criterion: the widest interval of thresholds that maximises the balanced accuracy of
    the validation patients' decisions, at its midpoint (lower on ties: sensitivity first).

    Args:
      probs, labels, slide_ids: the validation crops.
      min_cells: the rule's minimum; smaller slides are not used.
      q: the cell threshold.

    Returns:
      the `VerdictRule`, with the crop rates measured at q on the validation crops.
    """
    labels, probs, index, crop_infected, _ = _validation_slides(probs, labels, slide_ids, min_cells)
    threshold = choose_fraction_threshold(labels, probs, index.astype(str), threshold=q)
    return _measured_rule(
        "fraction", probs, labels, crop_infected, q, min_cells, threshold=threshold
    )


def choose_count_rule(
    probs: ArrayLike,
    labels: ArrayLike,
    slide_ids: Iterable[str | bytes],
    min_cells: int,
    q: float,
    max_false_alarm_rate: float = 0.0,
) -> VerdictRule:
    """The 'count' rule: the smallest k whose false alarms on the validation uninfected slides
    are at most ``max_false_alarm_rate`` of them (default 0: none).

    The smallest such k is the most sensitive: a slide called infected at k is called at any
    smaller k. q is fixed by the caller (compare several q by their validation figures).

    Args:
      probs, labels, slide_ids: the validation crops.
      min_cells: the rule's minimum; smaller slides are not used.
      q: a crop is confident iff p >= q.
      max_false_alarm_rate: the share of uninfected validation slides allowed to be called
        infected, in [0, 1).

    Returns:
      the `VerdictRule`, with the crop rates measured at q on the validation crops.
    """
    if not 0.0 <= max_false_alarm_rate < 1.0:
        raise ValueError(f"max_false_alarm_rate must be in [0, 1), got {max_false_alarm_rate}")
    _check_q(q)
    labels, probs, index, crop_infected, infected = _validation_slides(
        probs, labels, slide_ids, min_cells
    )
    confident = np.bincount(index, weights=probs >= q).astype(np.int64)
    healthy = confident[~infected]
    if healthy.size == 0:
        raise ValueError("no uninfected validation slide: the count rule cannot be fitted")
    ks = np.arange(1, healthy.max() + 2)
    alarms = np.mean(healthy[None, :] >= ks[:, None], axis=1)
    # alarms never increases with k and is 0 at max + 1, so some k qualifies.
    k = int(ks[np.nonzero(alarms <= max_false_alarm_rate + 1e-12)[0][0]])
    return _measured_rule("count", probs, labels, crop_infected, q, min_cells, k=k)


def choose_binomial_rule(
    probs: ArrayLike,
    labels: ArrayLike,
    slide_ids: Iterable[str | bytes],
    min_cells: int,
    q: float,
    alpha: float,
    use_upper_bound: bool = False,
) -> VerdictRule:
    """The 'binomial' rule at the stated significance alpha: nothing is chosen but the rates.

    The false-positive rate tested against is the one measured on the crops of the uninfected
    validation patients; with ``use_upper_bound`` the upper end of its Wilson 95% interval (a
    rate measured as 0 would otherwise call a slide with one confident crop infected).

    Args:
      probs, labels, slide_ids: the validation crops.
      min_cells: the rule's minimum; smaller slides are not used.
      q: a crop is confident iff p >= q.
      alpha: the significance, in (0, 1).
      use_upper_bound: test against the interval's upper end instead of the rate.

    Returns:
      the `VerdictRule`, with the crop rates measured at q on the validation crops.
    """
    labels, probs, _, crop_infected, _ = _validation_slides(probs, labels, slide_ids, min_cells)
    rule = _measured_rule("binomial", probs, labels, crop_infected, q, min_cells, alpha=alpha)
    if use_upper_bound:
        high = false_positive_rate(probs, labels, crop_infected, q)["high"]
        rule = VerdictRule.from_dict({**rule.to_dict(), "false_positive_rate": high})
    return rule


# The rules `fit_rule` fits: the three kinds, and the binomial test against the upper end of
# the false-positive rate's Wilson interval ('binomial_upper').
CANDIDATES = ("binomial_upper", "binomial", "fraction", "count")
QS = (0.5, 0.8, 0.9, 0.95, 0.99)


def _patients(labels, slide_ids) -> dict:
    return {s: bool(np.any(labels[slide_ids == s] == 1)) for s in np.unique(slide_ids)}


def _balanced_accuracy(truth: dict, called: dict) -> float:
    rates = [np.mean(x) for x in ([called[s] for s in truth if truth[s]],
                                  [not called[s] for s in truth if not truth[s]]) if x]  # fmt: skip
    return float(np.mean(rates))


def fit_rule(
    candidate: str,
    probs: ArrayLike,
    labels: ArrayLike,
    slide_ids: Iterable[str | bytes],
    min_cells: int,
    *,
    qs: Iterable[float] = QS,
    alpha: float = 0.01,
    light_fraction: float = 0.05,
) -> VerdictRule:
    """A rule of `candidate` fitted on these (validation) crops alone, q included.

    'fraction' is `choose_fraction_rule` at q = 0.5. The others try each q in ``qs`` ('count':
    `choose_count_rule`; 'binomial' and 'binomial_upper': `choose_binomial_rule` at ``alpha``,
    the latter against the rate's upper bound) and keep the one with the best balanced accuracy
    of these patients' verdicts; ties go to the larger modelled detection of a light infection
    (`detection_probability` at ``light_fraction`` of parasitized crops on a slide of the
    median slide size here), then to the larger q. A q where the measured crop sensitivity does
    not exceed the false-positive rate makes no rule and is skipped.

    Raises:
      ValueError: an unknown candidate, or no q gives a rule.
    """
    from mnres.metrics.verdicts import detection_probability, slide_verdicts

    if candidate not in CANDIDATES:
        raise ValueError(f"candidate must be one of {CANDIDATES}, got {candidate!r}")
    if candidate == "fraction":
        return choose_fraction_rule(probs, labels, slide_ids, min_cells, q=0.5)
    labels, probs, ids = _check_slides(labels, probs, slide_ids)
    known = ids != ""
    labels, probs, ids = labels[known], probs[known], ids[known]
    truth = _patients(labels, ids)
    median_cells = int(np.median(np.unique(ids, return_counts=True)[1]))
    best = None
    for q in qs:
        try:
            if candidate == "count":
                rule = choose_count_rule(probs, labels, ids, min_cells, q)
            else:
                upper = candidate == "binomial_upper"
                rule = choose_binomial_rule(probs, labels, ids, min_cells, q, alpha, upper)
        except ValueError as e:
            if "carries no information" in str(e):  # sensitivity <= false-positive rate at q
                continue
            raise
        called = {r["slide_id"]: r["verdict"] == "infected"
                  for r in slide_verdicts(probs, ids, rule)}  # fmt: skip
        usable = {s: t for s, t in truth.items() if s in called and
                  np.sum(ids == s) >= min_cells}  # fmt: skip
        light = detection_probability(rule, median_cells, light_fraction)
        key = (round(_balanced_accuracy(usable, called), 12), light, q)
        if best is None or key > best[0]:
            best = (key, rule)
    if best is None:
        raise ValueError(f"{candidate}: no q in {tuple(qs)} separates parasitized from healthy "
                         "crops on these slides")  # fmt: skip
    return best[1]


# The rule that patient cross-validation of the shipped recipe chose (docs/results.md, "Slide
# verdicts"): what a run fits on its validation slides and the shipped model carries.
DEFAULT_CANDIDATE = "fraction"
# 'plain': the verdict reads P(parasitized) as the model gives it; 'prior': moved by the slide
# prior (`mnres.metrics.slide_prior`), which needs the training split's prevalence.
SCORES = ("plain", "prior")
DEFAULT_SCORES = "plain"
# A slide of fewer readable crops is 'insufficient': fixed before the rules were compared.
MIN_CELLS = 20


def with_prior(probs, slide_ids, train_prevalence: float) -> np.ndarray:
    """P(parasitized) with each slide's prevalence in place of the training split's."""
    from mnres.metrics import slide_prior

    probs = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    adjusted = slide_prior.adjust(np.log(probs) - np.log1p(-probs), slide_ids, train_prevalence)
    return 1.0 / (1.0 + np.exp(-adjusted))


def rule_record(
    probs: ArrayLike,
    labels: ArrayLike,
    slide_ids: Iterable[str | bytes],
    *,
    candidate: str = DEFAULT_CANDIDATE,
    scores: str = DEFAULT_SCORES,
    train_prevalence: float | None = None,
    min_cells: int = MIN_CELLS,
    fitted_on: str = "validation split",
) -> dict[str, Any]:
    """The verdict rule of a model, fitted on its validation crops (`fit_rule`), as stored.

    Args:
      probs, labels, slide_ids: the validation crops (plain P(parasitized)).
      candidate: a `CANDIDATES` name.
      scores: 'plain', or 'prior' (the verdict reads slide-prior-adjusted P; needs
        train_prevalence).
      train_prevalence: the training split's parasitized share.
      min_cells: a slide of fewer crops is 'insufficient'.
      fitted_on: what the crops were, in words.

    Returns:
      dict: rule (`VerdictRule.to_dict`), candidate, scores, train_prevalence, the crop
      false-positive rate and sensitivity at the rule's q with their Wilson 95% intervals, the
      slides and crops it was fitted on.
    """
    if scores not in SCORES:
        raise ValueError(f"scores must be one of {SCORES}, got {scores!r}")
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    ids = np.array([str(s) for s in slide_ids])
    if scores == "prior":
        if train_prevalence is None:
            raise ValueError("a rule on slide-prior scores needs the training prevalence")
        probs = with_prior(probs, ids, train_prevalence)
    rule = fit_rule(candidate, probs, labels, ids, min_cells)
    # The rates the rule assumes, on the crops it was fitted on: slides of min_cells or more.
    usable = np.isin(ids, [s for s, n in zip(*np.unique(ids, return_counts=True), strict=True)
                           if s != "" and n >= min_cells])  # fmt: skip
    probs, labels, ids = probs[usable], labels[usable], ids[usable]
    patients = _patients(labels, ids)
    slide_infected = np.array([patients[s] for s in ids])
    return {
        "rule": rule.to_dict(),
        "candidate": candidate,
        "scores": scores,
        "train_prevalence": train_prevalence,
        "false_positive_rate": false_positive_rate(
            probs, labels, slide_infected, rule.q),
        "sensitivity": crop_sensitivity(probs, labels, rule.q),
        "fitted_on": {"what": fitted_on, "crops": int(len(probs)), "slides": len(patients),
                      "infected_slides": sum(patients.values())},
    }  # fmt: skip
