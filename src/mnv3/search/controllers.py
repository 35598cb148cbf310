"""Controllers for the block search: who proposes the next network, and how rewards teach it.

Every controller speaks the same two calls over a :class:`~mnv3.search.space.SearchSpace`'s
decision vectors: :meth:`Controller.ask` (the next candidate) and :meth:`Controller.tell` (its
reward, e.g. MnasNet's ``ACC x (LAT / TAR) ** w``, :func:`mnv3.report.reward`). :func:`run`
drives one against an evaluation function under a :class:`Budget`, so controllers are compared
at an equal number of evaluated candidates (a NAS claim against random search means nothing
otherwise).

- ``random``: uniform samples, the baseline every NAS claim must beat (Li & Talwalkar 2019
  found random search as good as several weight-sharing methods).
- ``evolution``: regularized evolution (Real et al., AAAI 2019): a population; each step the best
  of a random sample is the parent, one decision mutated is the child, the oldest member leaves.
- ``rl``: the paper's way (MnasNet §4.2, MobileNetV3 §4.1): an RNN controller samples decisions
  one by one and is trained by a policy gradient on the reward (REINFORCE with a moving-average
  baseline; MnasNet uses PPO, a refinement of the same gradient).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mnv3.errors import ConfigError

Choices = list[int]


class BudgetSpent(RuntimeError):
    """More candidates were asked for than the budget allows."""


@dataclass
class Budget:
    """At most ``total`` evaluated candidates; :meth:`spend` refuses the one past it."""

    total: int
    used: int = 0

    def spend(self) -> None:
        if self.used >= self.total:
            raise BudgetSpent(f"the budget of {self.total} evaluated candidates is spent")
        self.used += 1

    @property
    def left(self) -> int:
        return self.total - self.used


class Controller:
    """Proposes decision vectors over options ``sizes`` (one count per decision)."""

    def __init__(self, sizes: Sequence[int], seed: int = 0) -> None:
        self.sizes = list(sizes)
        self.rng = random.Random(seed)

    def ask(self) -> Choices:
        raise NotImplementedError

    def tell(self, choices: Choices, reward: float) -> None:
        """Learn from one evaluated candidate (nothing, for random search)."""

    def _uniform(self) -> Choices:
        return [self.rng.randrange(n) for n in self.sizes]


class RandomSearch(Controller):
    """Uniform samples from the space."""

    def ask(self) -> Choices:
        return self._uniform()


class RegularizedEvolution(Controller):
    """Regularized (aging) evolution: tournament parent, one mutation, oldest removed."""

    def __init__(
        self, sizes: Sequence[int], seed: int = 0, population: int = 20, sample: int = 5
    ) -> None:
        super().__init__(sizes, seed)
        if population < 2 or not 1 <= sample <= population:
            raise ConfigError(
                f"search.population={population}, search.sample={sample}; expected "
                "population >= 2 and 1 <= sample <= population"
            )
        self.population_size, self.sample_size = population, sample
        self.population: list[tuple[Choices, float]] = []

    def ask(self) -> Choices:
        if len(self.population) < self.population_size:
            return self._uniform()  # the first population is random
        contenders = self.rng.sample(self.population, self.sample_size)
        parent = max(contenders, key=lambda member: member[1])[0]
        child = list(parent)
        mutable = [i for i, n in enumerate(self.sizes) if n > 1]
        if mutable:
            i = self.rng.choice(mutable)
            child[i] = self.rng.choice([v for v in range(self.sizes[i]) if v != parent[i]])
        return child

    def tell(self, choices: Choices, reward: float) -> None:
        self.population.append((list(choices), reward))
        if len(self.population) > self.population_size:
            self.population.pop(0)  # the oldest leaves, however good (the "regularized")


class _Policy(nn.Module):
    """An LSTM that emits one categorical distribution per decision, fed its previous choice."""

    def __init__(self, sizes: Sequence[int], hidden: int) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.start = nn.Parameter(torch.zeros(1, hidden))
        self.embed = nn.ModuleList(nn.Embedding(n, hidden) for n in self.sizes)
        self.cell = nn.LSTMCell(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in self.sizes)

    def forward(
        self, choices: Choices | None, generator: torch.Generator
    ) -> tuple[Choices, torch.Tensor]:
        """Sample decisions (or score the given ``choices``); returns them and the log-prob."""
        x, state = self.start, None
        picked: Choices = []
        log_prob = torch.zeros(())
        for i, head in enumerate(self.heads):
            h, c = self.cell(x, state)
            state = (h, c)
            dist = torch.distributions.Categorical(logits=head(h)[0])
            if choices is None:
                value = int(torch.multinomial(dist.probs, 1, generator=generator))
            else:
                value = int(choices[i])
            log_prob = log_prob + dist.log_prob(torch.tensor(value))
            picked.append(value)
            x = self.embed[i](torch.tensor([value]))
        return picked, log_prob


class ReinforceRNN(Controller):
    """The paper's controller: an LSTM policy trained by REINFORCE on the reward, with an
    exponential moving-average baseline (``baseline_decay``) to reduce the gradient's variance."""

    def __init__(
        self,
        sizes: Sequence[int],
        seed: int = 0,
        hidden: int = 64,
        lr: float = 0.005,
        baseline_decay: float = 0.9,
    ) -> None:
        super().__init__(sizes, seed)
        torch.manual_seed(seed)
        self.policy = _Policy(sizes, hidden)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.baseline: float | None = None
        self.baseline_decay = baseline_decay

    def ask(self) -> Choices:
        with torch.no_grad():
            return self.policy(None, self.generator)[0]

    def tell(self, choices: Choices, reward: float) -> None:
        if self.baseline is None:
            self.baseline = reward
        advantage = reward - self.baseline
        self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * reward
        _, log_prob = self.policy(choices, self.generator)
        loss = -advantage * log_prob
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


CONTROLLERS: dict[str, type[Controller]] = {
    "random": RandomSearch,
    "evolution": RegularizedEvolution,
    "rl": ReinforceRNN,
}


@dataclass
class History:
    """Every evaluated candidate in order: its decisions and reward."""

    choices: list[Choices] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)

    def best(self) -> tuple[Choices, float]:
        i = max(range(len(self.rewards)), key=self.rewards.__getitem__)
        return self.choices[i], self.rewards[i]


def run(
    controller: Controller,
    evaluate: Callable[[Choices], float],
    budget: Budget,
    history: History | None = None,
) -> History:
    """Ask, evaluate, tell, until ``budget`` is spent; ``history`` (a resumed search's) is
    replayed into the controller first and counts against the budget."""
    history = history or History()
    for choices, reward in zip(history.choices, history.rewards, strict=True):
        budget.spend()
        controller.tell(choices, reward)
    while budget.left:
        choices = controller.ask()
        budget.spend()
        reward = evaluate(choices)
        if not math.isfinite(reward):
            raise ValueError(f"candidate {choices} got reward {reward}; expected a finite reward")
        controller.tell(choices, reward)
        history.choices.append(choices)
        history.rewards.append(reward)
    return history


def make_controller(name: str, sizes: Sequence[int], seed: int = 0, **options: float) -> Controller:
    """The controller ``search.controller`` names, with its options."""
    if name not in CONTROLLERS:
        raise ConfigError(
            f"search.controller={name!r} is unknown; expected one of {', '.join(CONTROLLERS)}"
        )
    return CONTROLLERS[name](sizes, seed, **options)  # type: ignore[arg-type]
