"""Which way a metric improves, from its name: a curated table, never a guess.

Frameworks infer the direction by substring (fastai: 'loss'/'error' -> min, so ``mae`` is
maximised) or by suffix (Hugging Face: ``endswith("loss")``, so ``eval_wer`` is maximised) or not at
all (Lightning minimises ``val_acc`` unless told). This module knows names, understands the usual
decorations around them, and raises on anything it does not know.
"""
from __future__ import annotations

import re

__all__ = ["infer_direction", "normalize_metric_name", "MIN_METRICS", "MAX_METRICS"]

MIN_METRICS = frozenset(
    """
    loss losses nll nll_loss neg_log_likelihood negative_log_likelihood log_loss logloss cross_entropy
    crossentropy xent ce ce_loss bce bce_loss categorical_crossentropy sparse_categorical_crossentropy
    binary_crossentropy kl kld kl_div kl_divergence kullback_leibler_divergence hinge squared_hinge
    huber huber_loss smooth_l1 l1 l1_loss l2 l2_loss
    error err error_rate err_rate errors misclassification_rate zero_one_loss
    mae mse rmse msle rmsle mape smape wape mean_absolute_error mean_squared_error
    root_mean_squared_error mean_squared_logarithmic_error mean_absolute_percentage_error
    mean_squared_log_error
    perplexity ppl wer cer ter per word_error_rate char_error_rate character_error_rate
    fid kid lpips fvd bpb bpc bpd bits_per_byte bits_per_char bits_per_character bits_per_dim
    brier brier_score ece calibration_error hamming_loss edit_distance levenshtein chamfer emd
    regret
    """.split()
)

MAX_METRICS = frozenset(
    """
    accuracy acc accuracy_score balanced_accuracy bal_acc categorical_accuracy
    sparse_categorical_accuracy binary_accuracy top_k_accuracy top_k_categorical_accuracy
    sparse_top_k_categorical_accuracy
    auc auroc roc_auc roc_auc_score pr_auc auprc aupr average_precision ap
    f1 f1_score fscore f_score fbeta fbeta_score f_beta f1_macro f1_micro f1_weighted macro_f1 micro_f1
    precision recall sensitivity specificity tpr tnr
    mcc matthews_corrcoef matthews_correlation r2 r2_score r_squared explained_variance
    bleu sacrebleu chrf chrf_plus meteor bertscore bert_score cider spice
    rouge rouge1 rouge2 rougel rougelsum rouge_1 rouge_2 rouge_l rouge_lsum
    iou miou mean_iou jaccard jaccard_index dice dice_score dice_coefficient
    map mean_ap mean_average_precision map50 map_50 map75 map_75 map50_95 map_50_95
    ndcg mrr hit_rate hits
    psnr ssim ms_ssim inception_score
    kappa cohen_kappa cohens_kappa quadratic_kappa spearman spearmanr pearson pearsonr
    exact_match em reward mean_reward episode_reward return mean_return
    """.split()
)

_MIN_PATTERNS = (
    re.compile(r"^top_?\d+_?(error|err|error_rate)$"),
)
_MAX_PATTERNS = (
    re.compile(r"^top_?\d+(_?(acc|accuracy))?$"),
    re.compile(r"^(ndcg|map|mrr|precision|recall|hit|hits|hit_rate|accuracy|acc|f1)(@|_at_|_at|_)?\d+$"),
    re.compile(r"^rouge_?(\d+|l|lsum)(_(f|f1|fmeasure|precision|recall))?$"),
    re.compile(r"^(f1|auc|auroc|accuracy|acc|precision|recall)_(macro|micro|weighted|samples|binary)$"),
)

_PREFIXES = ("validation_", "valid_", "val_", "eval_", "evaluation_", "test_", "training_", "train_", "dev_")
_SUFFIXES = ("_epoch", "_step", "_mean", "_avg")
_KERAS_SUFFIX = re.compile(r"_\d+$")


def normalize_metric_name(name: str) -> str:
    """Lower-case, keep the last ``a/b`` path part, unify separators (``-``, space, ``.`` -> ``_``)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"metric name must be a non-empty string, got {name!r}")
    n = name.strip().lower().split("/")[-1]
    n = re.sub(r"[\s\-.]+", "_", n).strip("_")
    return n


def _strip_prefixes(n: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if n.startswith(p) and len(n) > len(p):
                n, changed = n[len(p):], True
    return n


def _lookup(n: str) -> str | None:
    if n in MIN_METRICS:
        return "min"
    if n in MAX_METRICS:
        return "max"
    if any(p.match(n) for p in _MIN_PATTERNS):
        return "min"
    if any(p.match(n) for p in _MAX_PATTERNS):
        return "max"
    return None


def _candidates(n: str):
    yield n
    for s in _SUFFIXES:
        if n.endswith(s) and len(n) > len(s):
            yield n[: -len(s)]
    if _KERAS_SUFFIX.search(n):
        stripped = _KERAS_SUFFIX.sub("", n)
        yield stripped
        for s in _SUFFIXES:
            if stripped.endswith(s) and len(stripped) > len(s):
                yield stripped[: -len(s)]


def _direction_of(n: str) -> str | None:
    for cand in _candidates(n):
        for form in (cand, _strip_prefixes(cand)):
            mode = _lookup(form)
            if mode is not None:
                return mode
    return None


def infer_direction(name: str) -> str:
    """Return ``"min"`` or ``"max"`` for a known metric name; raise ``ValueError`` otherwise.

    Understands ``val_``/``valid_``/``validation_``/``eval_``/``test_``/``train_`` prefixes,
    ``a/b`` paths (the last part counts; when it is no metric, as in TensorBoard's ``loss/val``, the
    other parts may name it, and must then agree), Keras's ``_1`` de-duplication suffix,
    Lightning's ``_epoch``/``_step`` suffixes and any letter case. Never guesses from substrings.
    """
    n = normalize_metric_name(name)
    mode = _direction_of(n)
    if mode is not None:
        return mode
    parts = [normalize_metric_name(p) for p in name.split("/")[:-1] if p.strip()]
    found = {m for m in map(_direction_of, parts) if m is not None}
    if len(found) == 1:
        return found.pop()
    raise ValueError(
        f"cannot infer whether metric {name!r} should be minimised or maximised: it is not in the "
        f"direction table (normalised to {n!r}). Pass mode='min' or mode='max' explicitly."
    )
