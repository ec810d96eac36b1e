import pytest

from pytest_mlrepro.checkpoint.direction import infer_direction


@pytest.mark.parametrize("name,mode", [
    # names frameworks get wrong (fastai#2469, HF endswith("loss"), tf.keras#40604, Lightning default min)
    ("mae", "min"), ("mse", "min"), ("rmse", "min"), ("perplexity", "min"), ("eval_wer", "min"),
    ("eval_perplexity", "min"), ("eval_mae", "min"), ("val_auc", "max"), ("val_acc", "max"),
    ("top5_error", "min"), ("val_auc_1", "max"), ("val/loss", "min"),
    # decorations
    ("loss", "min"), ("val_loss", "min"), ("VAL_LOSS", "min"), ("valid_loss", "min"), ("validation_loss", "min"),
    ("train_loss", "min"), ("test_accuracy", "max"), ("eval_f1", "max"), ("train/acc", "max"),
    ("val_loss_epoch", "min"), ("val_accuracy_2", "max"), ("eval_cer", "min"), ("val-fid", "min"),
    ("top1_accuracy", "max"), ("top_5_accuracy", "max"), ("top5", "max"), ("error_rate", "min"),
    ("val_rouge_l", "max"), ("rougeLsum", "max"), ("mAP", "max"), ("map50_95", "max"), ("ndcg@10", "max"),
    ("val_miou", "max"), ("dice", "max"), ("psnr", "max"), ("ssim", "max"), ("mcc", "max"),
    ("matthews_corrcoef", "max"), ("r2", "max"), ("bleu", "max"), ("bpb", "min"), ("nll", "min"),
    ("val_roc_auc", "max"), ("precision", "max"), ("recall", "max"), ("f1_macro", "max"),
])
def test_known_names(name, mode):
    assert infer_direction(name) == mode


@pytest.mark.parametrize("name", ["score", "metric", "val_foo", "val_", "lossy_thing", "my_error_metric", "accuracy_gap",
                                  "mae_improvement", "epoch", "lr"])
def test_unknown_names_raise_and_ask_for_mode(name):
    with pytest.raises(ValueError, match="mode='min' or mode='max'") as info:
        infer_direction(name)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_not_a_name(bad):
    with pytest.raises(ValueError):
        infer_direction(bad)


@pytest.mark.parametrize("name", ["rouge_loss", "val_rouge_loss", "rougelogits", "loss_rouge"])
def test_names_that_only_start_like_a_table_entry_raise(name):
    with pytest.raises(ValueError, match="mode"):
        infer_direction(name)


@pytest.mark.parametrize("name, mode", [("loss/val", "min"), ("acc/valid", "max"), ("val/loss", "min"),
                                        ("train/epoch_1/accuracy", "max")])
def test_tensorboard_style_paths(name, mode):
    assert infer_direction(name) == mode


@pytest.mark.parametrize("name", ["loss/acc/x", "x/y", "runs/val"])
def test_paths_whose_parts_disagree_or_name_nothing_raise(name):
    with pytest.raises(ValueError):
        infer_direction(name)
