"""PyTorch transcription of UNITER's pretraining losses and IPOT (test oracle).

Written from the documented semantics of the official code (model/pretrain.py,
model/ot.py, pretrain.py), in the official packed form: the losses take only
the masked rows (``x[mask]``), exactly as the official heads receive them, and
reduce with the official ``.mean()``. Used by tests/test_losses.py,
tests/test_ot.py and benchmarks/bench_wra.py.
"""
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# Losses (official reductions).
# ----------------------------------------------------------------------------
def mlm_loss(scores, labels):
  """scores [N, V] at the masked tokens, labels [N]; CE mean."""
  return F.cross_entropy(scores, labels, reduction="none").mean()


def mrfr_loss(pred, target):
  """pred/target [N, D] at the masked regions; MSE mean over N x D."""
  return F.mse_loss(pred, target, reduction="none").mean()


def mrc_loss(logits, soft):
  """CE against argmax(soft[:, 1:]) + 1, background ignored; mean."""
  target = torch.max(soft[:, 1:], dim=-1)[1] + 1
  return F.cross_entropy(logits, target, ignore_index=0,
                         reduction="none").mean()


def mrckl_loss(logits, soft):
  """KL(soft || softmax(logits)) elementwise, mean over N x C."""
  return F.kl_div(F.log_softmax(logits, dim=-1), soft,
                  reduction="none").mean()


def itm_loss(logits, targets):
  return F.cross_entropy(logits, targets, reduction="none").mean()


# ----------------------------------------------------------------------------
# WRA: cosine cost, IPOT, distance (official algorithm).
# ----------------------------------------------------------------------------
def cosine_cost(x, y, eps=1e-5):
  xn = F.normalize(x, p=2, dim=-1, eps=eps)
  yn = F.normalize(y, p=2, dim=-1, eps=eps)
  return 1 - xn.matmul(yn.transpose(1, 2))


@torch.no_grad()
def ipot(cost, x_len, x_pad, y_len, y_pad, joint_pad, beta, iteration, k):
  """cost [B, M, N]; x_* text side (M), y_* image (N). Returns [B, N, M]."""
  b, m, n = cost.shape
  sigma = torch.ones(b, m, dtype=cost.dtype) / x_len.unsqueeze(1)
  t = torch.ones(b, n, m, dtype=cost.dtype)
  a = torch.exp(-cost.transpose(1, 2) / beta)
  sigma = sigma.masked_fill(x_pad, 0)
  jp = joint_pad.transpose(1, 2)
  t = t.masked_fill(jp, 0)
  a = a.masked_fill(jp, 0)
  x_len = x_len[:, None, None]
  y_len = y_len[:, None, None]
  x_mask = (x_pad.to(cost.dtype) * 1e4)[:, None]
  y_mask = (y_pad.to(cost.dtype) * 1e4)[:, None]
  for _ in range(iteration):
    q = a * t
    sigma = sigma.view(b, m, 1)
    for _ in range(k):
      delta = 1 / (y_len * q.matmul(sigma).view(b, 1, n) + y_mask)
      sigma = 1 / (x_len * delta.matmul(q) + x_mask)
    t = delta.view(b, n, 1) * q * sigma
  return t.masked_fill(jp, 0)


def ot_distance(txt, img, txt_pad, img_pad, beta=0.5, iteration=50, k=1):
  """Official optimal_transport_dist: trace(C @ T) with T detached."""
  cost = cosine_cost(txt, img)
  joint_pad = txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2)
  cost = cost.masked_fill(joint_pad, 0)
  txt_len = (txt_pad.size(1) - txt_pad.sum(1)).to(cost.dtype)
  img_len = (img_pad.size(1) - img_pad.sum(1)).to(cost.dtype)
  t = ipot(cost.detach(), txt_len, txt_pad, img_len, img_pad, joint_pad,
           beta, iteration, k)
  # trace(C @ T) == sum_ij C_ij T_ji
  return torch.einsum("bmn,bnm->b", cost, t.detach())


def wra_loss(dist, targets):
  pos = dist.masked_select(targets == 1)
  neg = dist.masked_select(targets == 0)
  return (pos.sum() - neg.sum()) / (pos.numel() + neg.numel())
