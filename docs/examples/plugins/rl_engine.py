"""A worked engine for another domain (docs/extending.md, "An engine"): searching the
observation encoder of a reinforcement-learning agent, added by this one file.

The agent is PPO (clipped policy ratio, a value head, generalised advantage estimation)
acting in a Gymnasium environment (``data.name``: ``CartPole-v1`` or ``Acrobot-v1``, the
classic-control tasks; Gymnasium is the one extra dependency: ``pip install
'gymnasium>=0.29'``). Its policy and value heads read one encoder, and the encoder is what
is searched, as in "Differentiable Architecture Search for Reinforcement Learning" (Miao
et al., 2022): the space ``rl_encoder`` is a DARTS cell over feature vectors. Node 0 is
the observation through a stem (linear, tanh); each of ``nodes`` intermediate nodes sums its
incoming edges (from every earlier node) and keeps one after discretization, each edge
chosen among ``none``, ``skip_connect``, ``linear_relu``, ``linear_tanh`` and
``linear_ln_relu`` (linear, LayerNorm, ReLU); the encoder's output is the concatenation of
the intermediate nodes.

There is no dataset: every epoch collects a fresh rollout (``engine.envs`` environments x
``engine.steps`` steps) with the current supernet and relaxed architecture, then makes
``engine.ppo_epochs`` passes over it in minibatches of ``data.batch_size`` transitions, all
on the PPO loss (the config's ``engine`` section holds these and PPO's other constants:
:class:`PPOSettings`). A bilevel strategy splits each rollout into two random halves, as
DARTS splits its training set: the weights learn on one, the alphas on the other (a step
takes one minibatch of each); a single-level one learns on all of it. The
retraining runs PPO from scratch on the derived encoder (Adam, ``retrain.lr``,
``retrain.batch_size`` transitions per minibatch) and its runs are judged by a
:class:`~diffnas.engine.engines.Metric` of their own: the mean return of the greedy policy
over ``engine.test_episodes`` test episodes (seeds apart from the training ones; higher is
better). Environments are checkpointed with their random generators, so a cut run resumed
equals an uninterrupted one.

    diffnas search "plugins=[docs/examples/plugins/rl_engine.py]" \\
        search.space.name=rl_encoder data.name=CartPole-v1 search.epochs=10 \\
        "search.strategy={name: darts, w_optim: {lr: 0.05}, a_optim: {lr: 0.01}}" \\
        retrain.epochs=100 retrain.lr=0.003

(10 s on a 2-core CPU; docs/extending.md has the figures.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from diffnas.arch import ArchParams
from diffnas.config import ConfigError, RunConfig, require, require_sizes
from diffnas.engine.callbacks import counted
from diffnas.engine.checkpoint import seed_everything
from diffnas.engine.engines import (
    Engine,
    Metric,
    engine_settings,
    refuse_image_search_settings,
    register_engine,
)
from diffnas.engine.loop import Loop
from diffnas.engine.retrain import retrain_dir, run_retrain_loop, save_retrain_result
from diffnas.engine.rundir import resolve_device
from diffnas.engine.search import (
    StrategyTask,
    run_search_loop,
    search_callbacks,
)
from diffnas.genotype import CellGenotype, Genotype
from diffnas.spaces import DataShape, EdgeSpec, SearchSpace, create_space, register_space
from diffnas.strategies import create_strategy, strategy_class
from diffnas.strategies.objective import check_finite_loss

CELL = "encoder"
ENVIRONMENTS = ("CartPole-v1", "Acrobot-v1")  # discrete actions, vector observations
TEST_SEED = 2 ** 40  # the greedy test episodes are seeded from it, apart from training's
RECENT = 10  # a search or training epoch reports the mean return of the last RECENT episodes


@dataclass
class PPOSettings:
    """This engine's settings, the config's ``engine`` section (``Engine.settings``): each
    epoch's rollout and PPO's constants, e.g. ``"engine={envs: 16, steps: 128}"``."""

    envs: int = 8  # environments stepped together
    steps: int = 64  # steps of each per epoch: a rollout holds envs x steps transitions
    ppo_epochs: int = 2  # passes over a rollout
    gamma: float = 0.99  # discount
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # PPO's ratio clip
    value_coef: float = 0.5  # weight of the value loss
    entropy_coef: float = 0.01  # weight of the entropy bonus
    test_episodes: int = 10  # greedy episodes the retrained policy is judged on

    def __post_init__(self) -> None:
        for name in ("envs", "steps", "ppo_epochs", "test_episodes"):
            require(getattr(self, name) >= 1, f"engine.{name}", ">= 1", getattr(self, name))
        require(self.envs * self.steps >= 2, "engine.envs x engine.steps",
                ">= 2 (a bilevel strategy splits each rollout in two halves)",
                self.envs * self.steps)
        for name in ("gamma", "lam"):
            require(0.0 <= getattr(self, name) <= 1.0, f"engine.{name}", "in [0, 1]",
                    getattr(self, name))
        require(self.clip > 0, "engine.clip", "> 0", self.clip)
        for name in ("value_coef", "entropy_coef"):
            require(getattr(self, name) >= 0, f"engine.{name}", ">= 0", getattr(self, name))

    @property
    def transitions(self) -> int:
        """The transitions of one rollout."""
        return self.envs * self.steps


def ppo_settings(cfg: RunConfig) -> PPOSettings:
    """The run's :class:`PPOSettings` (its ``engine`` section, defaults filled in)."""
    return engine_settings(cfg)


# --- the environments (this engine's "datasets") --------------------------------------------
def _gymnasium() -> Any:
    try:
        import gymnasium
    except ImportError:
        raise ConfigError("the rl engine (docs/examples/plugins/rl_engine.py) needs Gymnasium: "
                          "pip install 'gymnasium>=0.29' (or diffnas's extra: pip install "
                          "'diffnas[rl]')") from None
    return gymnasium


def env_shape(name: str) -> tuple[int, int, int]:
    """(observation size, number of actions, steps per episode) of environment ``name``."""
    if name not in ENVIRONMENTS:
        raise ConfigError(f"data.name: {name!r} is not an environment of the rl engine; one "
                          f"of {', '.join(ENVIRONMENTS)}")
    gym = _gymnasium()
    env = gym.make(name)
    shape = (int(np.prod(env.observation_space.shape)), int(env.action_space.n),
             int(gym.spec(name).max_episode_steps))
    env.close()
    return shape


class Envs:
    """``count`` copies of a classic-control environment stepped together, each reset as
    its episode ends (termination, or the episode's step limit: a truncation). Its state
    (the physics, the random generators, step counts, returns) is a plain dict, saved in
    checkpoints."""

    def __init__(self, name: str, count: int, seed: int) -> None:
        gym = _gymnasium()
        self.name = name
        self.envs = [gym.make(name).unwrapped for _ in range(count)]  # own step limit below
        self.limit = env_shape(name)[2]
        obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(self.envs)]
        self.obs = torch.tensor(np.stack(obs), dtype=torch.float32)
        self.steps = [0] * count
        self.returns = [0.0] * count
        self.finished: list[float] = []  # returns of the last RECENT episodes that ended
        self.episodes = 0  # episodes ended so far

    def step(self, actions: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """Rewards, ``done`` (an episode ended: reset) and the final observations of the
        truncated ones (their value is bootstrapped); ``self.obs`` becomes the next one."""
        rewards, done, truncated, obs = [], [], [], []
        for i, (env, a) in enumerate(zip(self.envs, actions.tolist(), strict=True)):
            o, r, terminated, _, _ = env.step(int(a))
            self.steps[i] += 1
            self.returns[i] += float(r)
            cut = not terminated and self.steps[i] >= self.limit
            if cut:
                truncated.append((i, torch.tensor(o, dtype=torch.float32)))
            if terminated or cut:
                self.finished = [*self.finished, self.returns[i]][-RECENT:]
                self.episodes += 1
                self.steps[i], self.returns[i] = 0, 0.0
                o = env.reset()[0]
            rewards.append(float(r))
            done.append(terminated or cut)
            obs.append(o)
        self.obs = torch.tensor(np.stack(obs), dtype=torch.float32)
        return torch.tensor(rewards), torch.tensor(done, dtype=torch.float32), truncated

    def recent_return(self) -> float:
        """The mean return of the last RECENT finished episodes (NaN before the first)."""
        return sum(self.finished) / len(self.finished) if self.finished else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"obs": self.obs.clone(), "steps": list(self.steps),
                "returns": list(self.returns), "finished": list(self.finished),
                "episodes": self.episodes,
                "envs": [{"state": np.asarray(env.state, dtype=np.float64).tolist(),
                          "rng": env.np_random.bit_generator.state,
                          "beyond": getattr(env, "steps_beyond_terminated", None)}
                         for env in self.envs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.obs = state["obs"].clone()
        self.steps, self.returns = list(state["steps"]), list(state["returns"])
        self.finished, self.episodes = list(state["finished"]), state["episodes"]
        for env, s in zip(self.envs, state["envs"], strict=True):
            env.state = np.asarray(s["state"], dtype=np.float64)
            env.np_random.bit_generator.state = s["rng"]
            if hasattr(env, "steps_beyond_terminated"):
                env.steps_beyond_terminated = s["beyond"]


# --- the space ------------------------------------------------------------------------------
ENCODER_OPS = ("none", "skip_connect", "linear_relu", "linear_tanh", "linear_ln_relu")


class _Zero(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * 0.0


def _op(name: str, width: int) -> nn.Module:
    if name == "none":
        return _Zero()
    if name == "skip_connect":
        return nn.Identity()
    tail = {"linear_relu": [nn.ReLU()], "linear_tanh": [nn.Tanh()],
            "linear_ln_relu": [nn.LayerNorm(width), nn.ReLU()]}[name]
    return nn.Sequential(nn.Linear(width, width), *tail)


@dataclass
class EncoderConfig:
    hidden: int = 32
    nodes: int = 3
    ops: list[str] = field(default_factory=lambda: list(ENCODER_OPS))

    def __post_init__(self) -> None:
        unknown = [o for o in self.ops if o not in ENCODER_OPS]
        if unknown:
            raise ConfigError(f"search.space.ops: unknown encoder op(s) {unknown}; known: "
                              f"{', '.join(ENCODER_OPS)}")
        if all(o == "none" for o in self.ops):
            raise ConfigError("search.space.ops: the rl_encoder space needs an op besides "
                              "'none'")
        require(len(set(self.ops)) == len(self.ops), "search.space.ops", "without repeats",
                self.ops)
        require(self.hidden >= 1, "search.space.hidden", ">= 1", self.hidden)
        require(1 <= self.nodes <= 32, "search.space.nodes", "in 1..32", self.nodes)


@dataclass
class EncoderNetworkConfig:
    """The retrained encoder (``retrain.network``); None = the search value."""

    hidden: int | None = None

    def __post_init__(self) -> None:  # a width >= 1, or None: refused before the search
        require_sizes(self, ("hidden",), "retrain.network")


class _Heads(nn.Module):
    """The policy's action logits and the state value, both read from the encoder."""

    def __init__(self, features: int, actions: int) -> None:
        super().__init__()
        self.policy, self.value = nn.Linear(features, actions), nn.Linear(features, 1)
        nn.init.orthogonal_(self.policy.weight, 0.01)  # a near-uniform first policy
        nn.init.zeros_(self.policy.bias)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy(h), self.value(h).squeeze(-1)


class _SuperNet(nn.Module):
    """Stem, the encoder cell with every op on every edge (weighted), the two heads."""

    def __init__(self, observations: int, actions: int, config: EncoderConfig) -> None:
        super().__init__()
        self.nodes = config.nodes
        self.stem = nn.Linear(observations, config.hidden)
        self.edges = nn.ModuleList(
            nn.ModuleList(_op(o, config.hidden) for o in config.ops)
            for dst in range(1, config.nodes + 1) for _ in range(dst))
        self.heads = _Heads(config.hidden * config.nodes, actions)

    def forward(self, obs: torch.Tensor, arch_weights: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        weights, states, e = arch_weights[CELL], [torch.tanh(self.stem(obs))], 0
        for _dst in range(1, self.nodes + 1):
            total = 0
            for src, h in enumerate(states):  # the mixed edge src -> dst
                ops = zip(weights[e + src], self.edges[e + src], strict=True)
                total = total + sum(w * op(h) for w, op in ops)
            e += len(states)
            states.append(total)
        return self.heads(torch.cat(states[1:], -1))


class Agent(nn.Module):
    """Stem, the genotype's encoder (one op per kept edge), the two heads."""

    def __init__(self, observations: int, actions: int, hidden: int, cell: CellGenotype
                 ) -> None:
        super().__init__()
        self.cell = cell
        self.stem = nn.Linear(observations, hidden)
        self.edges = nn.ModuleList(_op(e.op, hidden) for e in cell.edges)
        self.heads = _Heads(hidden * len(cell.concat), actions)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = {0: torch.tanh(self.stem(obs))}
        for dst in sorted({e.dst for e in self.cell.edges}):
            states[dst] = sum(op(states[e.src]) for e, op in
                              zip(self.cell.edges, self.edges, strict=True) if e.dst == dst)
        return self.heads(torch.cat([states[n] for n in self.cell.concat], -1))


@register_space("rl_encoder")
class EncoderSpace(SearchSpace):
    engine = "rl"
    Config = EncoderConfig
    NetworkConfig = EncoderNetworkConfig

    def edges(self) -> list[EdgeSpec]:
        ops = tuple(self.config.ops)
        return [EdgeSpec(f"{CELL}/n{dst}/e{src}", CELL, src, dst, ops)
                for dst in range(1, self.config.nodes + 1) for src in range(dst)]

    def inputs_per_node(self) -> int:
        return 1  # node 1 has a single predecessor (the stem)

    def concat_candidates(self, group: str) -> tuple[int, ...]:
        return self.concat(group)  # the encoder's output: every intermediate node

    def build_supernet(self) -> nn.Module:
        return _SuperNet(self.shape.in_channels, self.shape.num_classes, self.config)

    def build_network(self, genotype: Genotype, **overrides: Any) -> nn.Module:
        self.validate(genotype)
        n = self.network_settings(overrides)  # None: the search's value
        return Agent(self.shape.in_channels, self.shape.num_classes,
                     n["hidden"], genotype.cell(CELL))


def _space(cfg: RunConfig) -> SearchSpace:
    observations, actions, _ = env_shape(cfg.data.name)
    return create_space(cfg.search.space, DataShape(in_channels=observations, resolution=1,
                                                    num_classes=actions))


# --- PPO ------------------------------------------------------------------------------------
class PPOObjective:
    """The clipped PPO loss of a minibatch of transitions (a dict: ``obs``, ``actions``,
    ``logp`` (under the acting policy), ``advantages``, ``returns``) plus the value loss,
    minus an entropy bonus; reports each part and the approximate KL to the acting policy."""

    def __init__(self, settings: PPOSettings) -> None:
        self.clip, self.value_coef = settings.clip, settings.value_coef
        self.entropy_coef = settings.entropy_coef

    def inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["obs"]

    def __call__(self, output: tuple[torch.Tensor, torch.Tensor],
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits, value = output
        dist = Categorical(logits=logits)
        logp = dist.log_prob(batch["actions"])
        adv = batch["advantages"]
        adv = (adv - adv.mean()) / (adv.std() + 1e-8) if adv.numel() > 1 else adv
        ratio = torch.exp(logp - batch["logp"])
        clipped = ratio.clamp(1 - self.clip, 1 + self.clip)
        policy = -torch.minimum(ratio * adv, clipped * adv).mean()
        value_loss = 0.5 * (batch["returns"] - value).pow(2).mean()
        entropy = dist.entropy().mean()
        loss = policy + self.value_coef * value_loss - self.entropy_coef * entropy
        check_finite_loss(loss.item())
        kl = (batch["logp"] - logp).mean()
        return loss, {"loss": loss.item(), "policy_loss": policy.item(),
                      "value_loss": value_loss.item(), "entropy": entropy.item(),
                      "approx_kl": kl.item()}


def gae(rewards: torch.Tensor, values: torch.Tensor, done: torch.Tensor,
        last_value: torch.Tensor, gamma: float = PPOSettings.gamma,
        lam: float = PPOSettings.lam) -> torch.Tensor:
    """Generalised advantage estimates of a rollout, (steps, envs) each: the
    (gamma * lam)-discounted sum of the TD errors ``r_t + gamma V(s_t+1) - V(s_t)`` up to the
    end of the rollout or of the episode (``done[t]``: the episode ended at step t, so
    nothing after it counts); ``last_value`` is V of the observation after the rollout."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(len(rewards))):
        keep = 1.0 - done[t]
        delta = rewards[t] + gamma * last_value * keep - values[t]
        running = delta + gamma * lam * keep * running
        advantages[t], last_value = running, values[t]
    return advantages


def acting(net: Any, device: torch.device) -> Any:
    """``net`` (obs -> logits, values) for the environments: observations in on
    ``device``, the outputs back on the CPU where the environments step."""
    return lambda obs: tuple(t.cpu() for t in net(obs.to(device)))


@torch.no_grad()
def collect(envs: Envs, act: Any, steps: int, gamma: float = PPOSettings.gamma,
            lam: float = PPOSettings.lam) -> dict[str, torch.Tensor]:
    """A rollout of ``steps`` steps of every environment with the network ``act`` (obs ->
    logits, values), actions drawn from torch's generator; returns its transitions (flat,
    ``steps * len(envs)``) with GAE advantages and the returns the value head learns."""
    keys = ("obs", "actions", "logp", "values", "rewards", "done")
    rollout: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for _ in range(steps):
        obs = envs.obs
        logits, values = act(obs)
        dist = Categorical(logits=logits)
        actions = dist.sample()
        rewards, done, truncated = envs.step(actions)
        for i, final in truncated:  # a time limit is not a failure: bootstrap its value
            rewards[i] += gamma * act(final[None])[1][0]
        for k, v in zip(keys, (obs, actions, dist.log_prob(actions), values, rewards, done),
                        strict=True):
            rollout[k].append(v)
    r = {k: torch.stack(v) for k, v in rollout.items()}  # (steps, envs)
    r["advantages"] = gae(r["rewards"], r["values"], r["done"], act(envs.obs)[1], gamma, lam)
    r["returns"] = r["advantages"] + r["values"]
    return {k: r[k].flatten(0, 1) for k in ("obs", "actions", "logp", "advantages",
                                             "returns")}


def minibatches(rollout: dict[str, torch.Tensor], size: int,
                passes: int = PPOSettings.ppo_epochs) -> Iterator[dict[str, Any]]:
    """``passes`` passes over the rollout in a random order, ``size`` at a time (the last
    minibatch of a pass is smaller where ``size`` does not divide the rollout)."""
    n = len(rollout["obs"])
    for _ in range(passes):
        order = torch.randperm(n)
        for i in range(0, n, size):
            yield {k: v[order[i:i + size]] for k, v in rollout.items()}


def steps_per_epoch(transitions: int, size: int, passes: int = PPOSettings.ppo_epochs) -> int:
    """The minibatches :func:`minibatches` yields from ``transitions``."""
    return passes * math.ceil(transitions / size)


def training_seed(seed: int, phase: str, envs: int = PPOSettings.envs) -> int:
    """The seed of the first of a phase's ``envs`` environments (the others count up from
    it): the search's and the retraining's differ, and both stay below TEST_SEED."""
    return ((2 * seed + (phase == "retrain")) * envs) % TEST_SEED


@torch.no_grad()
def test_return(policy: Any, env_name: str, episodes: int = PPOSettings.test_episodes) -> float:
    """The mean return of the greedy policy (``policy``: obs -> action logits) over
    ``episodes`` episodes seeded from TEST_SEED, starts no training rollout used."""
    envs = Envs(env_name, episodes, TEST_SEED)
    total, running = torch.zeros(episodes), torch.ones(episodes, dtype=torch.bool)
    while running.any():
        rewards, done, _ = envs.step(policy(envs.obs).argmax(-1))
        total += rewards * running
        running &= done == 0
    return float(total.mean())


# --- search ---------------------------------------------------------------------------------
class EncoderSearchTask(StrategyTask):
    """One rollout per epoch, then PPO minibatch steps of the strategy on it."""

    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        seed_everything(cfg.seed)
        self.space, self.rule = _space(cfg), cfg.search.discretizer
        self.batch_size, self.device = cfg.data.batch_size, device
        self.ppo = ppo = ppo_settings(cfg)
        supernet = self.space.build_supernet().to(device)
        arch = ArchParams(self.space).to(device)
        self.objective = PPOObjective(ppo)
        self.strategy = create_strategy(cfg.search.strategy, supernet, arch, self.objective,
                                        cfg.search.epochs)
        self.envs = Envs(cfg.data.name, ppo.envs, training_seed(cfg.seed, "search", ppo.envs))

    def batches(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        # One relaxed architecture acts for the whole rollout. With a sampling relaxation
        # (GDAS, SNAS) each step then draws its own cell, so PPO's ratio compares the
        # policy under the step's cell with the one that acted: off-policy in the
        # architecture, which the ratio clip bounds (few_shot after its split: the exported
        # sub-supernet acts, every sub-supernet learns from its rollouts).
        with torch.no_grad():
            arch_weights = self.strategy.arch_weights()
        act = acting(lambda obs: self.strategy.supernet(obs, arch_weights), self.device)
        ppo = self.ppo
        rollout = {k: v.to(self.device)
                   for k, v in collect(self.envs, act, ppo.steps, ppo.gamma, ppo.lam).items()}
        if not self.strategy.uses_validation:  # single level: every transition, weights only
            yield from ((part, None) for part in minibatches(rollout, self.batch_size,
                                                               ppo.ppo_epochs))
            return
        halves = [{k: v[i] for k, v in rollout.items()}  # weights, alphas: disjoint halves
                  for i in torch.randperm(ppo.transitions).to(self.device).chunk(2)]
        yield from zip(minibatches(halves[0], self.batch_size, ppo.ppo_epochs),
                       minibatches(halves[1], self.batch_size, ppo.ppo_epochs), strict=True)

    def num_batches(self) -> int:
        halves = 2 if self.strategy.uses_validation else 1
        return steps_per_epoch(self.ppo.transitions // halves, self.batch_size,
                               self.ppo.ppo_epochs)

    def step(self, batch: Any) -> dict[str, float]:
        return self.strategy.step(*batch)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        self.strategy.end_epoch()
        return {"return": self.envs.recent_return(), "episodes": self.envs.episodes}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "envs": self.envs.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.envs.load_state_dict(state.pop("envs"))
        super().load_state_dict(state)


@dataclass
class EncoderSearchResult:
    genotype: Genotype
    history: list[dict[str, float]]


def run_encoder_search(cfg: RunConfig, run_dir: str | Path, resume: bool = False,
                       stop_after: int | None = None) -> EncoderSearchResult:
    """Search the encoder; writes ``run_dir/search`` like every diffnas search
    (``stop_after``: end after that many epochs, as an interrupted run would)."""
    out = Path(run_dir) / "search"
    out.mkdir(parents=True, exist_ok=True)
    task = EncoderSearchTask(cfg, resolve_device(cfg.device))
    loop = Loop(task, cfg.search.epochs, search_callbacks(task, out, cfg))
    history, genotype = run_search_loop(loop, task, out, resume, stop_after,
                                        f"rl encoder search: {cfg.data.name}, PPO", "steps")
    return EncoderSearchResult(genotype, history)


# --- retraining -----------------------------------------------------------------------------
class AgentTrainTask:
    """PPO from scratch on the derived agent: a rollout per epoch, Adam on its minibatches."""

    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device) -> None:
        self.model, self.r, self.device = model, cfg.retrain, device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.retrain.lr)
        self.ppo = ppo = ppo_settings(cfg)
        self.objective = PPOObjective(ppo)
        self.envs = Envs(cfg.data.name, ppo.envs, training_seed(cfg.seed, "retrain", ppo.envs))

    def batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        ppo = self.ppo
        rollout = collect(self.envs, acting(self.model, self.device), ppo.steps, ppo.gamma,
                          ppo.lam)
        yield from minibatches({k: v.to(self.device) for k, v in rollout.items()},
                               self.r.batch_size, ppo.ppo_epochs)

    def num_batches(self) -> int:
        return steps_per_epoch(self.ppo.transitions, self.r.batch_size, self.ppo.ppo_epochs)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        loss, stats = self.objective(self.model(batch["obs"]), batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.r.grad_clip)
        self.optimizer.step()
        return stats

    def end_epoch(self, epoch: int) -> dict[str, float]:
        return {"return": self.envs.recent_return(), "episodes": self.envs.episodes}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "envs": self.envs.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.envs.load_state_dict(state["envs"])


def run_agent_retrain(cfg: RunConfig, genotype: Genotype, run_dir: str | Path,
                      resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Train ``genotype``'s agent from scratch; writes ``run_dir/retrain`` (metrics,
    checkpoint, genotype.json, model.pt, result.json with ``mean_return``)."""
    out = retrain_dir(run_dir, genotype, resume)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = _space(cfg).build_network(genotype, **cfg.retrain.network).to(device)
    task = AgentTrainTask(model, cfg, device)
    loop, history = run_retrain_loop(task, cfg, out, resume, stop_after)
    model.eval()
    ppo = task.ppo
    result = {"genotype": genotype.to_dict(), "epochs_done": loop.epoch,
              "env_steps": loop.epoch * ppo.transitions,
              "params": sum(p.numel() for p in model.parameters()),
              "mean_return": test_return(lambda obs: acting(model, device)(obs)[0],
                                         cfg.data.name, ppo.test_episodes),
              "test_episodes": ppo.test_episodes,
              "history": history}
    save_retrain_result(out, model, result)
    return result


# --- the engine -----------------------------------------------------------------------------
def print_agent_result(genotype: Genotype, result: dict[str, Any] | None) -> None:
    print("\n== genotype ==")
    print(genotype)
    if result is not None:
        print(f"params: {result['params']:,}")
        episodes = result.get("test_episodes", PPOSettings.test_episodes)  # (older results)
        print(f"mean return of the greedy policy over {episodes} test episodes: "
              f"{result['mean_return']:.1f} after {counted(result['epochs_done'], 'epoch')} "
              f"({result['env_steps']:,} environment steps)")


def agent_summary(cfg: RunConfig, genotype: Genotype) -> dict[str, Any]:
    observations, actions, limit = env_shape(cfg.data.name)
    model = _space(cfg).build_network(genotype, **cfg.retrain.network)
    return {"observations": observations, "actions": actions, "episode_limit": limit,
            "params": sum(p.numel() for p in model.parameters())}


def check_agent_search(cfg: RunConfig, device: bool = True) -> None:
    """Settings this engine cannot honour: refused, not ignored."""
    refuse_image_search_settings(cfg)  # amp, compile, cuda_graph, ...
    if cfg.search.strategy.get("name") == "random_labels":
        raise ConfigError("search.strategy.name=random_labels is not supported by the rl "
                          "engine (docs/examples/plugins/rl_engine.py): PPO has no labels to "
                          "draw at random")
    ppo = ppo_settings(cfg)
    rollout = f"a rollout of engine.envs x engine.steps = {ppo.envs} x {ppo.steps} transitions"
    if strategy_class(cfg.search.strategy).uses_validation:
        most, why = ppo.transitions // 2, (f"half {rollout}: a bilevel strategy's weights and "
                                            "alphas learn on one half each")
    else:  # single level: the weights (and alphas) learn on the whole rollout
        most, why = ppo.transitions, rollout
    require(1 <= cfg.data.batch_size <= most, "data.batch_size", f"in 1..{most} ({why})",
            cfg.data.batch_size)


def check_gymnasium(cfg: RunConfig) -> None:
    """Every run: Gymnasium is importable (said before a run directory exists)."""
    _gymnasium()


def check_agent_retrain(cfg: RunConfig) -> None:
    ppo = ppo_settings(cfg)
    require(1 <= cfg.retrain.batch_size <= ppo.transitions, "retrain.batch_size",
            f"in 1..{ppo.transitions} (a rollout of engine.envs x engine.steps = {ppo.envs} x "
            f"{ppo.steps} transitions)", cfg.retrain.batch_size)


#: higher is better; CartPole-v1's episodes end at 500
MEAN_RETURN = Metric("mean_return", "return", "return", ".1f", "return",
                     title="Mean return of the retrained greedy policy (test episodes)",
                     search_title=f"mean return of the supernet's last {RECENT} training "
                                  "episodes")

register_engine(Engine(
    name="rl", label="rl (rl_engine.py)",
    a_run="an rl run (PPO in a Gymnasium environment)", data_kind="Gymnasium environment",
    datasets=lambda: ENVIRONMENTS, report=print_agent_result,
    run_search=run_encoder_search, run_retrain=run_agent_retrain, summary=agent_summary,
    check_config=check_gymnasium, check_search=check_agent_search,
    check_retrain=check_agent_retrain, metric=MEAN_RETURN, settings=PPOSettings,
    unused_data=("download", "resolution", "train_subset", "test_subset", "search_split",
                 "root"),
    unread_retrain=("lr_min", "momentum", "weight_decay", "auxiliary_weight", "drop_path",
                    "cutout", "crop_padding", "flip", "train_subset")))
