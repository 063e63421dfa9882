"""Every head trains only on targets that exist: token t+i of the same sample, and of the same document when
documents are masked from each other."""

import torch

from mtp_megatron.model.targets import shift_targets

E = 99  # EOD
# tokens = [x, 10, 11, 12, E, 20, 21, E]: documents ...10 11 12 E | 20 21 E; labels[t] = tokens[t+1].
LABELS = torch.tensor([[10, 11, 12, E, 20, 21, E, 30]])


def masks(document_eod=None, loss_mask=None):
    loss_mask = torch.ones(1, 8) if loss_mask is None else loss_mask
    labels, head_masks = shift_targets(LABELS, loss_mask, n_heads=3, document_eod=document_eod)
    return [l[0].tolist() for l in labels], [m[0].tolist() for m in head_masks]


def test_head_i_targets_token_t_plus_i_and_the_tail_is_masked():
    labels, head_masks = masks()
    assert labels == [[10, 11, 12, E, 20, 21, E, 30], [11, 12, E, 20, 21, E, 30, 0], [12, E, 20, 21, E, 30, 0, 0]]
    assert head_masks == [[1] * 8, [1] * 7 + [0], [1] * 6 + [0, 0]]


def test_document_ends_with_documents_masked_from_each_other():
    labels, head_masks = masks(document_eod=E)
    assert labels == masks()[0]  # the same targets, fewer of them trained on
    assert head_masks[0] == [1] * 8  # head 1 is unchanged (as in Megatron)
    # Head 2 at t predicts token t+2; it may predict the EOD itself (t=2) but not past it (t=3, t=6).
    assert head_masks[1] == [1, 1, 1, 0, 1, 1, 0, 0]
    # Head 3 also stops one position earlier before each EOD.
    assert head_masks[2] == [1, 1, 0, 0, 1, 0, 0, 0]


def test_the_loss_mask_follows_its_target_token():
    loss_mask = torch.ones(1, 8)
    loss_mask[0, 4] = 0  # the target labels[4] (token 20) is not trained on
    _, head_masks = masks(loss_mask=loss_mask)
    assert head_masks[0][4] == 0 and head_masks[1][3] == 0 and head_masks[2][2] == 0
    assert sum(map(sum, head_masks)) == (8 - 1) + (7 - 1) + (6 - 1)


def test_targets_of_a_real_sample_are_its_own_tokens(byte_datasets, tmp_path):
    from mtp_megatron.config import load_config
    from mtp_megatron.data.datasets import build_datasets
    from mtp_megatron.distributed.parallel import destroy_distributed, init_distributed

    cfg = load_config(None, [f"data.paths=[{byte_datasets[0]}]", "model.seq_length=32", "train.iters=2",
                             f"run.dir={tmp_path}", "train.device=cpu"])
    env = init_distributed(cfg.parallel, "cpu", cfg.train.seed)
    try:
        train, _ = build_datasets(cfg, env)
        for index in range(len(train)):
            sample = train[index]
            text = torch.cat([sample["tokens"], sample["labels"][-1:]])  # the seq_length + 1 tokens read
            labels, head_masks = shift_targets(sample["labels"][None], sample["loss_mask"][None], n_heads=4)
            for i in range(1, 5):
                valid = head_masks[i - 1][0].bool()
                assert valid.sum() == 32 - (i - 1)
                assert torch.equal(labels[i - 1][0][valid], text[i:])
    finally:
        destroy_distributed()
