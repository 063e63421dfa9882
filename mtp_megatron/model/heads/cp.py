"""Rank-r CP heads (``mtp.head_type=cp``, Basharin, Chertkov and Oseledets 2024): the next n tokens' joint
distribution as a mixture of r products of per-token factors,

    P(x_{t+1..t+n} | z_t) = sum_a w_a(z_t) prod_s P_a^(s)(x_{t+s} | z_t),

with w = softmax(M z_t) (``cp_mixture``, r values) and each factor P_a^(s) a softmax over the vocabulary through the
shared norm and unembedding from its own hidden state u_s + E_{s,a} u_s: u_s is head s's transformer layer on z (as
in the transformer design) and E_s (``cp_expand.{s}``, d -> r d) expands it into r vectors. Rank 1 has no M or E:
w = 1 and the factors are the transformer heads, so it is that design's model and loss exactly.

Loss at position t (counted where head 1 has a target): the mixture's negative log-likelihood of the targets that
exist there, -log sum_a w_a prod_s P_a^(s)(x_{t+s})^{lambda_s} (lambda_s: the heads' loss weights, 1 by default),
normalised like head 1's loss (over head 1's target count in the global batch); plus ``balance_coef`` times a
Switch-Transformer load-balancing term, r sum_a f_a P_a over the microbatch's counted positions (f_a: the fraction
whose largest weight is w_a, P_a: the mean of w_a), which is 1 when the components are used evenly and pushes
toward that. Logged per head: the marginal loss -log sum_a w_a P_a^(s)(x_{t+s}) and its top-1 accuracy; extra rows:
``cp/joint`` (the mixture loss), ``cp/balance`` and ``cp/weight_a`` (each component's mean weight).

One factor's logits alive at a time, exactly: the gradient of -log sum_a w_a prod_s P_a^(s) is -sum_a gamma_a
d(log w_a + sum_s lambda_s log P_a^(s)), gamma_a being component a's posterior at that position. So per chunk of
positions a first pass (no grad) computes every factor's target log-probability and gamma, and a second pass
recomputes each factor's logits and back-propagates its cross-entropy weighted by gamma_a, one factor at a time.
All n heads' layer outputs and factor states are alive together (every head's factors make each position's gamma),
the head layers' activations are not (they are recomputed in backward, as for the chained designs); the logits
are recomputed once (r n unembeddings twice per chunk instead of once).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

from mtp_megatron.model.heads.inputs import STAT_CORRECT, STAT_LOSS_SUM, STAT_TOKENS, HeadInputs, HeadTargets
from mtp_megatron.model.heads.linear import ReplicatedLinear
from mtp_megatron.model.heads.transformer import TransformerHeads


class CPHeads(TransformerHeads):
    head_type = "cp"

    def __init__(self, *args, cp_rank: int = 1, cp_balance_coef: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.balance_coef = cp_rank, cp_balance_coef
        config, hidden = self.config, self.config.hidden_size
        if cp_rank > 1:
            with self.seeded("cp_mixture"):
                self.cp_mixture = ReplicatedLinear(hidden, cp_rank, config, config.init_method)
            expand = []
            for s in range(self.n_heads):
                with self.seeded(f"cp_expand/{s}"):
                    expand.append(ReplicatedLinear(hidden, cp_rank * hidden, config, config.output_layer_init_method))
            self.cp_expand = torch.nn.ModuleList(expand)

    @property
    def extra_stats(self) -> tuple[str, ...]:
        from mtp_megatron.model.heads import extra_stat_names

        return extra_stat_names(self.head_type, self.rank)

    def groups(self) -> list[list[int]]:
        return [list(range(self.n_heads))]

    def hidden_states(self, group: list[int], z: Tensor, inputs: HeadInputs, recompute: bool = False) -> list[Tensor]:
        """[u_1, ..., u_n] and, at rank > 1, the mixture's logits M z ([s, b, r])."""
        layer = self.checkpointed_layer if recompute else self.apply_layer
        out = [layer(s, z, inputs) for s in group]
        return out + [self.cp_mixture(z)] if self.rank > 1 else out

    # ---------------------------------------------------------------- the parts of the model

    def factor_states(self, s: int, u: Tensor) -> list[Tensor]:
        """The r hidden states of head s's factors from its layer output ``u``."""
        if self.rank == 1:
            return [u]
        expanded = self.cp_expand[s](u).unflatten(-1, (self.rank, -1))
        return [u + expanded[..., a, :] for a in range(self.rank)]

    def log_weights(self, hidden: list[Tensor]):
        """log w ([s, b, r] float64, the whole sequence under sequence parallelism, laid out as the labels) with its
        graph; None at rank 1 (w = 1)."""
        if self.rank == 1:
            return None
        mix = hidden[self.n_heads]
        if self.config.sequence_parallel:
            # Every TP rank computes the same gradient for the gathered logits, so backward keeps its own slice
            # rather than summing over the ranks.
            mix = gather_from_sequence_parallel_region(mix, tensor_parallel_output_grad=False, group=self.tp_group)
        # float64 for the mixture's few numbers per position: its gradient sums (w - gamma) z over positions, which
        # cancels, and the two orders sum it differently (one backward, or one per chunk).
        return torch.log_softmax(mix.double(), dim=-1)

    def loss_weights(self, inputs: HeadInputs) -> list[float]:
        return [1.0] * self.n_heads if inputs.loss_weights is None else inputs.loss_weights.tolist()

    def normaliser(self, inputs: HeadInputs, targets: HeadTargets) -> Tensor:
        """What a position's mixture loss is multiplied by: head 1's global normaliser, or 1 / its target count in
        this microbatch (evaluation)."""
        if inputs.weights is not None:
            return inputs.weights[0]
        return 1.0 / targets.num_tokens.clamp(min=1)

    def balance(self, log_w: Tensor, counted: Tensor) -> Tensor:
        """Switch-Transformer load balance r sum_a f_a P_a over the counted positions ([s, b] mask)."""
        w = log_w.exp()
        total = counted.sum().clamp(min=1)
        chosen = torch.nn.functional.one_hot(w.detach().argmax(-1), self.rank).to(w.dtype)
        fraction = (chosen * counted.unsqueeze(-1)).sum((0, 1)) / total
        mean_weight = (w * counted.unsqueeze(-1)).sum((0, 1)) / total
        return self.rank * (fraction * mean_weight).sum()

    # ---------------------------------------------------------------- scoring

    @torch.no_grad()
    def _log_softmax(self, logits: Tensor) -> Tensor:
        """Vocab-parallel log-softmax [c, b, V/tp] (no grad: evaluation and decoding)."""
        top = logits.max(dim=-1, keepdim=True).values
        torch.distributed.all_reduce(top, torch.distributed.ReduceOp.MAX, group=self.tp_group)
        sums = (logits - top).exp().sum(dim=-1, keepdim=True)
        torch.distributed.all_reduce(sums, group=self.tp_group)
        return logits - top - sums.log()

    @torch.no_grad()
    def _score_factor(self, logits: Tensor, labels: Tensor, log_w_a: Tensor | None, probs: Tensor | None):
        """One factor's log P_a(target) [c, b] and the marginal's probabilities so far plus w_a P_a ([c, b, V/tp]).

        megatron-core's vocab-parallel cross-entropy steps, so the log-probabilities are the naive order's to the
        bit (gamma, and the mixture weights' cancelling gradient, depend on them); they work in place, leaving the
        factor's softmax in ``logits``, which becomes ``probs`` for the first factor: scoring a factor holds no
        buffer of the logits' size beyond the logits and ``probs``."""
        steps = VocabParallelCrossEntropy
        logits, top = steps.calculate_logits_max(logits)
        torch.distributed.all_reduce(top, torch.distributed.ReduceOp.MAX, group=self.tp_group)
        start = torch.distributed.get_rank(self.tp_group) * logits.size(-1)
        _, _, target, sum_exp, exp = steps.calculate_predicted_logits(logits, labels, top, start,
                                                                      start + logits.size(-1))
        torch.distributed.all_reduce(target, group=self.tp_group)
        torch.distributed.all_reduce(sum_exp, group=self.tp_group)
        softmax, nll = steps.calculate_cross_entropy_loss(exp, target, sum_exp)
        if log_w_a is not None:
            softmax.mul_(log_w_a.float().exp())
        return -nll, softmax if probs is None else probs.add_(softmax)

    def _chunk_scores(self, factors, log_w, targets, lambdas, chunk, stats, grad: bool):
        """One chunk's J_a = log w_a + sum_s lambda_s m_s log P_a^(s)(target) ([c, b, r], with its graph if
        ``grad``) and its log w ([c, b, r] or None); adds the chunk's per-head marginal loss and top-1 hits to
        ``stats``. Each factor's logits are formed once and freed before the next; without ``grad`` (the
        sequential backward's first pass, evaluation) they are scored in place."""
        lw = None if log_w is None else targets[0].take(log_w, chunk)
        lw_value = None if lw is None else lw.detach()
        joint = lw if grad else lw_value
        for s, states in enumerate(factors):
            labels, mask = targets[s].chunk(chunk)
            probs, logp = None, []
            for a, state in enumerate(states):
                w_a = None if lw_value is None else lw_value[..., a : a + 1]
                with torch.set_grad_enabled(grad):
                    logits = self.unembed(state[chunk]).float()
                if grad:
                    scored = logits.detach().clone()
                    logp.append(-self.cross_entropy(logits, labels))  # overwrites fp32 logits in place
                    probs = self._score_factor(scored, labels, w_a, probs)[1]
                    del scored
                else:
                    log_p, probs = self._score_factor(logits, labels, w_a, probs)
                    logp.append(log_p)
                del logits
            stats[s, STAT_CORRECT] += (self.top1_correct(probs, labels) * mask).sum().double()
            del probs
            with torch.set_grad_enabled(grad):
                logp = torch.stack(logp, dim=-1)
                term = lambdas[s] * mask.unsqueeze(-1) * logp
                joint = term if joint is None else joint + term
            with torch.no_grad():
                marginal = logp.detach() if lw_value is None else lw_value + logp.detach()
                stats[s, STAT_LOSS_SUM] -= (torch.logsumexp(marginal, dim=-1) * mask).sum().double()
        return joint, lw

    def _first_pass(self, factors, log_w, targets, lambdas, chunk, stats):
        """``_chunk_scores`` without a graph, over the chunk's two halves: a factor's logits and the marginal's
        probabilities, alive together, then take one chunk's logits' memory, what the second pass's backward takes."""
        mid = chunk.start + (chunk.stop - chunk.start + 1) // 2
        parts = [part for part in (slice(chunk.start, mid), slice(mid, chunk.stop)) if part.stop > part.start]
        scores = [self._chunk_scores(factors, log_w, targets, lambdas, part, stats, grad=False) for part in parts]
        shards = targets[0].shards  # each part's rows are every rank's slice of it, in rank order: interleave

        def join(pieces: list[Tensor]) -> Tensor:
            return torch.cat([p.view(shards, -1, *p.shape[1:]) for p in pieces], dim=1).flatten(0, 1)

        return join([j for j, _ in scores]), None if log_w is None else join([lw for _, lw in scores])

    def _setup(self, hidden: list[Tensor], inputs: HeadInputs, stats: Tensor):
        targets = [self.targets(inputs, s) for s in range(self.n_heads)]
        for s in range(self.n_heads):
            stats[s, STAT_TOKENS] = targets[s].num_tokens.double()
        factors = [self.factor_states(s, hidden[s]) for s in range(self.n_heads)]
        return targets, factors, self.log_weights(hidden)

    def _mixture_stats(self, stats: Tensor, log_w, counted: Tensor):
        """The balance term (with its graph; zero at rank 1) and the extra rows but the joint loss's sum."""
        n = self.n_heads
        stats[n, STAT_TOKENS] += counted.sum().double()
        stats[n + 2 :, STAT_TOKENS] += counted.sum().double()
        stats[n + 1, STAT_TOKENS] += 1
        if log_w is None:
            stats[n + 2 :, STAT_LOSS_SUM] += counted.sum().double()
            return counted.new_zeros(())
        balance = self.balance(log_w, counted)
        stats[n + 1, STAT_LOSS_SUM] += balance.detach().double()
        stats[n + 2 :, STAT_LOSS_SUM] += (log_w.detach().exp() * counted.unsqueeze(-1)).sum((0, 1)).double()
        return balance

    def group_loss(self, group: list[int], hidden: list[Tensor], inputs: HeadInputs, stats: Tensor) -> Tensor:
        targets, factors, log_w = self._setup(hidden, inputs, stats)
        lambdas, norm = self.loss_weights(inputs), self.normaliser(inputs, targets[0])
        total = hidden[0].new_zeros((), dtype=torch.float32)
        for chunk in self.chunks(hidden[0].size(0)):
            if torch.is_grad_enabled():
                joint, _ = self._chunk_scores(factors, log_w, targets, lambdas, chunk, stats, grad=True)
            else:
                joint, _ = self._first_pass(factors, log_w, targets, lambdas, chunk, stats)
            counted = targets[0].chunk(chunk)[1]
            nll = -torch.logsumexp(joint, dim=-1) * counted
            stats[self.n_heads, STAT_LOSS_SUM] += nll.detach().sum().double()
            total = total + (norm * nll.sum()).float()
        return total + (self.balance_coef * self._mixture_stats(stats, log_w, targets[0].mask)).float()

    def group_backward(self, group: list[int], hidden: list[Tensor], inputs: HeadInputs, grad_scale: Tensor,
                       stats: Tensor, last_group: bool) -> list[Tensor]:
        leaves = [h.requires_grad_() for h in hidden]  # the detached values, as leaves of this group's graph
        targets, factors, log_w = self._setup(leaves, inputs, stats)
        lambdas, norm = self.loss_weights(inputs), self.normaliser(inputs, targets[0])
        factor_grads = [[torch.zeros_like(state) for state in states] for states in factors]
        chunks = list(self.chunks(leaves[0].size(0)))
        for c, chunk in enumerate(chunks):
            # First pass: every factor's target log-probability, no graph, so that gamma is known.
            joint, lw = self._first_pass(factors, log_w, targets, lambdas, chunk, stats)
            counted = targets[0].chunk(chunk)[1]
            gamma = torch.softmax(joint, dim=-1)
            stats[self.n_heads, STAT_LOSS_SUM] -= (torch.logsumexp(joint, dim=-1) * counted).sum().double()
            # Second pass: one factor's logits at a time, its cross-entropy weighted by gamma_a.
            for s, states in enumerate(factors):
                labels, mask = targets[s].chunk(chunk)
                for a, state in enumerate(states):
                    self.mark_shared_grads_ready(last_group and c == len(chunks) - 1 and s == self.n_heads - 1
                                                 and a == self.rank - 1)
                    piece = state[chunk].detach().requires_grad_()
                    token_weight = (norm * lambdas[s] * counted * mask * gamma[..., a]).float()
                    loss = (self.cross_entropy(self.unembed(piece).float(), labels) * token_weight).sum()
                    torch.autograd.backward(loss, grad_scale)
                    del loss
                    factor_grads[s][a][chunk] = piece.grad
            if lw is not None:  # the mixture weights' share of this chunk: -norm sum_a gamma_a log w_a
                torch.autograd.backward(-(norm * counted.unsqueeze(-1) * gamma * lw).sum().float(), grad_scale,
                                        retain_graph=True)
        balance = self._mixture_stats(stats, log_w, targets[0].mask)
        if log_w is not None:
            torch.autograd.backward((self.balance_coef * balance).float(), grad_scale)
            # Through the expansions into each head's layer output (once per head).
            torch.autograd.backward([st for states in factors for st in states],
                                    [g for grads in factor_grads for g in grads])
        else:
            for leaf, (grad,) in zip(leaves, factor_grads):
                leaf.grad = grad
        return [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]

    @torch.no_grad()
    def logits(self, head: int, z: Tensor, inputs: HeadInputs) -> Tensor:
        """Head ``head``'s marginal log-probabilities log sum_a w_a P_a^(head) [s, b, V/tp] (vocab-parallel; the
        plain logits at rank 1), what evaluation scores and greedy decoding takes the argmax of."""
        hidden = self.hidden_states(list(range(self.n_heads)), z, inputs)
        log_w = self.log_weights(hidden)
        if log_w is None:
            return self.unembed(hidden[head])
        out = None
        for a, state in enumerate(self.factor_states(head, hidden[head])):
            lp = self._log_softmax(self.unembed(state).float()) + log_w[..., a : a + 1].float()
            out = lp if out is None else torch.logaddexp(out, lp)
        return out
