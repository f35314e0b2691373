"""docs/examples/plugins/rl_engine.py, the worked engine that searches a PPO agent's
observation encoder in a Gymnasium environment: its advantage estimates against their
definition, its environments' checkpoints, its greedy test episodes, a search that ends
in a policy far above chance, cut-and-resumed runs equal to uninterrupted ones, every
strategy on its minibatches, and its refusals."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import cut_and_resumed, tb_events

from diffnas.cli import main
from diffnas.genotype import Genotype

RL = Path(__file__).resolve().parents[1] / "docs" / "examples" / "plugins" / "rl_engine.py"
CARTPOLE = [f"plugins=[{RL}]", "search.space={name: rl_encoder, hidden: 32, nodes: 3}",
            "data.name=CartPole-v1", "search.epochs=10", "retrain.epochs=100",
            "retrain.lr=0.003", "retrain.batch_size=64",
            "search.strategy={name: darts, w_optim: {lr: 0.05}, a_optim: {lr: 0.01}}",
            "progress=false"]


def _rl():
    from diffnas.plugins import import_plugins

    (module,) = import_plugins([str(RL)])
    return module


def _pole_heuristic(obs: torch.Tensor) -> torch.Tensor:
    """Push the cart toward where the pole falls (angle plus half its angular velocity):
    a hand-written CartPole controller that balances every episode to its limit."""
    return torch.nn.functional.one_hot((obs[:, 2] + 0.5 * obs[:, 3] > 0).long(), 2).float()


def test_advantages_are_the_discounted_td_errors_up_to_each_episode_s_end():
    """``gae`` against its definition written out as sums, in float64, with episode ends
    (``done``) inside the rollout: nothing after an end counts, the last step bootstraps
    from the value after the rollout."""
    rl = _rl()
    g = torch.Generator().manual_seed(0)
    steps, envs, gamma, lam = 7, 3, 0.9, 0.8
    rewards = torch.randn(steps, envs, generator=g, dtype=torch.float64)
    values = torch.randn(steps, envs, generator=g, dtype=torch.float64)
    last = torch.randn(envs, generator=g, dtype=torch.float64)
    done = torch.zeros(steps, envs, dtype=torch.float64)
    done[2, 0] = done[5, 0] = done[6, 1] = 1.0
    got = rl.gae(rewards, values, done, last, gamma, lam)
    following = torch.cat([values[1:], last[None]])  # V(s_t+1)
    delta = rewards + gamma * following * (1 - done) - values
    for e in range(envs):
        for t in range(steps):
            want, k = 0.0, t
            while k < steps:
                want += (gamma * lam) ** (k - t) * float(delta[k, e])
                if done[k, e]:
                    break
                k += 1
            assert float(got[t, e]) == pytest.approx(want, abs=1e-12), (t, e)


def test_a_controller_balances_every_test_episode_and_a_fixed_push_fails():
    """The greedy test counts each episode's rewards once, up to its end: CartPole's step
    limit (500) for a balancing controller, a few steps for one that always pushes left."""
    rl = _rl()
    assert rl.test_return(_pole_heuristic, "CartPole-v1") == 500.0
    left = rl.test_return(lambda o: torch.tensor([[1.0, 0.0]]).expand(len(o), 2),
                          "CartPole-v1")
    assert 5 < left < 20


@pytest.mark.parametrize("name, actions", [("CartPole-v1", 2), ("Acrobot-v1", 3)])
def test_environments_restored_from_their_state_step_as_the_originals(name, actions):
    """An ``Envs`` saved mid-episode (through torch.save, as in a checkpoint) and loaded
    into fresh copies gives the same observations, rewards and episode ends afterwards:
    the physics, the step counts and each copy's random generator (the next episode's
    start) are restored. (A 40-step limit makes Acrobot's episodes end too.)"""
    rl = _rl()
    g = torch.Generator().manual_seed(1)
    a = rl.Envs(name, 4, seed=3)
    a.limit = 40
    for _ in range(30):
        a.step(torch.randint(0, actions, (4,), generator=g))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = rl.Envs(name, 4, seed=99)
    b.limit = 40
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(a.obs, b.obs)
    ends = 0
    for _ in range(60):
        step = torch.randint(0, actions, (4,), generator=g)
        ra, da, _ = a.step(step)
        rb, db, _ = b.step(step)
        assert torch.equal(ra, rb) and torch.equal(da, db) and torch.equal(a.obs, b.obs)
        ends += int(da.sum())
    assert ends > 0  # episodes ended and restarted from the restored generators
    assert a.finished == b.finished


def test_the_rl_example_searches_an_encoder_whose_policy_balances_the_pole(tmp_path, capsys):
    """Search (10 PPO epochs of DARTS) and retraining (100 epochs, 51,200 steps) on
    CartPole-v1: the greedy policy's mean test return is far above a random policy's (about
    22) and a fixed push's (about 9); the unchanged commands resume, size and report it by
    its own Metric; TensorBoard logs both phases."""
    assert main(["search", *CARTPOLE, f"out_dir={tmp_path}", "name=r",
                 "logger=tensorboard"]) == 0
    run = tmp_path / "r"
    for phase in ("search", "retrain"):  # a plugin engine's loops take the loggers too
        assert tb_events(run / "tensorboard" / phase).Tags()["scalars"], phase
    genotype = Genotype.load(run / "search" / "genotype.json")
    assert len(genotype.cell("encoder").edges) == 3
    result = json.loads((run / "retrain" / "result.json").read_text())
    assert result["mean_return"] >= 100, result["mean_return"]  # seeds 0-7: 187 to 500
    assert result["env_steps"] == 100 * 8 * 64
    search = [json.loads(line) for line in (run / "search" / "metrics.jsonl").open()]
    assert search[-1]["return"] > search[0]["return"]  # the supernet's policy learned too
    out = capsys.readouterr().out
    assert f"over 10 test episodes: {result['mean_return']:.1f} after 100 epochs" in out
    assert main(["search", "--resume", str(run)]) == 0
    assert f"{result['mean_return']:.1f}" in capsys.readouterr().out
    assert main(["train", "--genotype", str(run / "search" / "genotype.json"), "--dry-run",
                 *CARTPOLE]) == 0
    sized = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert sized["params"] == result["params"] and sized["observations"] == 4
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "Mean return of the retrained greedy policy" in page
    assert "<th>mean return of the supernet&#x27;s last 10 training episodes (last epoch)" in page


@pytest.mark.parametrize("strategy", ["darts", "gdas"])
def test_the_rl_example_resumed_equals_an_uninterrupted_run(tmp_path, strategy):
    """Cut after some epochs of search and of retraining, then resumed: the same alphas,
    genotype, returns and test result as one uninterrupted run (the environments, their
    generators and the action draws come back from the checkpoints)."""
    from diffnas.config import load_config

    rl = _rl()
    cfg = load_config(None, [*CARTPOLE, "search.epochs=6", "retrain.epochs=6",
                             f"search.strategy={{name: {strategy}, a_optim: {{lr: 0.05}}}}"])
    whole, resumed, full, again = cut_and_resumed(rl.run_encoder_search,
                                                  rl.run_agent_retrain, cfg, tmp_path, 2, 4)
    assert resumed.history == whole.history
    assert again["history"] == full["history"]
    assert again["mean_return"] == full["mean_return"]


@pytest.mark.parametrize("strategy", [
    "{name: darts, order: 2}", "{name: single_level}", "{name: implicit}",
    "{name: zero_order}", "{name: mean_shift}", "{name: snas}", "{name: few_shot}"])
def test_every_strategy_searches_the_encoder_on_ppo_minibatches(tmp_path, strategy):
    """The PPO minibatches (dicts of tensors) pass through every strategy: two epochs end
    with finite losses and a genotype of the space."""
    rl = _rl()
    from diffnas.config import load_config

    cfg = load_config(None, [*CARTPOLE, "search.epochs=2", "data.batch_size=128",
                             f"search.strategy={strategy}"])
    result = rl.run_encoder_search(cfg, tmp_path)
    assert len(result.history) == 2
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
    assert len(result.genotype.cell("encoder").edges) == 3


def test_the_rl_example_refuses_what_it_cannot_do():
    from diffnas.config import ConfigError, load_config

    for override, words in (
            ("search.strategy={name: random_labels}", "not supported by the rl engine"),
            ("search.amp=bf16", "search.amp is for image searches; the rl (rl_engine.py) "
             "search does not take it"),
            ("data.name=Pendulum-v1", "'Pendulum-v1' is not a Gymnasium environment dataset"),
            ("data.batch_size=300", "data.batch_size must be in 1..256"),
            ("retrain.batch_size=513", "retrain.batch_size must be in 1..512"),
            ("search.space.ops=[none]", "needs an op besides 'none'"),
            ("search.space.ops=[conv_3x3]", "unknown encoder op(s) ['conv_3x3']"),
            ("data.resolution=8", "data.resolution is not used by an rl run"),
            ("retrain.network={C: 8}", "unknown config key(s) retrain.network.C; valid keys of "
             "retrain.network: hidden"),
            ("retrain.network={hidden: 0}", "retrain.network.hidden must be"),
            ("retrain.network={hidden: -4}", "retrain.network.hidden must be"),
            ("search.strategy={name: single_level}\0data.batch_size=513",
             "data.batch_size must be in 1..512 (a rollout")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config(None, [*CARTPOLE, *override.split("\0")])


def test_without_gymnasium_the_rl_example_says_what_to_install(monkeypatch, tmp_path, capsys):
    """Gymnasium missing: the run is refused before its directory exists, naming the
    package to install."""
    _rl()
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # import gymnasium: ImportError
    assert main(["search", *CARTPOLE, f"out_dir={tmp_path}", "name=r"]) != 0
    assert "needs Gymnasium: pip install 'gymnasium>=0.29'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("batch_size", [64, 100, 256])
def test_a_bilevel_search_s_weights_and_alphas_learn_on_disjoint_halves(batch_size):
    """A bilevel strategy's weights and alphas learn on two disjoint halves of each rollout
    (as DARTS splits its training set); each pass covers its half once, the last minibatch
    smaller where the size does not divide it."""
    from diffnas.config import load_config

    rl = _rl()
    cfg = load_config(None, [*CARTPOLE, f"data.batch_size={batch_size}"])
    task = rl.EncoderSearchTask(cfg, torch.device("cpu"))
    pairs = list(task.batches(0))
    per_pass = -(-256 // batch_size)
    assert len(pairs) == task.num_batches() == 2 * per_pass
    train = torch.cat([t["obs"] for t, _ in pairs[:per_pass]])
    val = torch.cat([v["obs"] for _, v in pairs[:per_pass]])
    assert len(torch.unique(train, dim=0)) == len(torch.unique(val, dim=0)) == 256
    assert not (torch.cdist(train, val) == 0).any()
    assert torch.equal(torch.unique(train, dim=0),
                       torch.unique(torch.cat([t["obs"] for t, _ in pairs[per_pass:]]), dim=0))


def test_the_engine_section_sets_the_rollout_and_ppo_constants(tmp_path, capsys):
    """``engine={envs: 4, steps: 32, ppo_epochs: 3, ...}``: rollouts of 4 x 32 transitions,
    three passes over each, the retrained policy judged on the given test episodes; the
    section is saved with the run, so a resumed run keeps it."""
    from diffnas.config import load_config

    rl = _rl()
    section = "engine={envs: 4, steps: 32, ppo_epochs: 3, test_episodes: 3, clip: 0.1}"
    cfg = load_config(None, [*CARTPOLE, section, "data.batch_size=16"])
    assert rl.ppo_settings(cfg) == rl.PPOSettings(envs=4, steps=32, ppo_epochs=3,
                                                  test_episodes=3, clip=0.1)
    task = rl.EncoderSearchTask(cfg, torch.device("cpu"))
    pairs = list(task.batches(0))
    assert len(pairs) == task.num_batches() == 3 * (64 // 16)  # 3 passes over a half of 128
    assert len(task.envs.obs) == 4 and task.objective.clip == 0.1
    assert main(["search", *CARTPOLE, section, "data.batch_size=16", "search.epochs=1",
                 "retrain.epochs=2", f"out_dir={tmp_path}", "name=r"]) == 0
    assert "over 3 test episodes" in capsys.readouterr().out
    result = json.loads((tmp_path / "r" / "retrain" / "result.json").read_text())
    assert result["env_steps"] == 2 * 128 and result["test_episodes"] == 3
    saved = load_config(tmp_path / "r" / "config.yaml", saved=True)
    assert rl.ppo_settings(saved) == rl.ppo_settings(cfg)


def test_list_engines_shows_the_rl_settings(capsys):
    assert main(["list", "engines", f"plugins=[{RL}]"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("rl ")]
    assert line.endswith("; settings (engine section): envs=8, steps=64, ppo_epochs=2, "
                         "gamma=0.99, lam=0.95, clip=0.2, value_coef=0.5, entropy_coef=0.01, "
                         "test_episodes=10")


def test_bad_engine_settings_are_refused_by_name():
    from diffnas.config import ConfigError, load_config

    for override, words in (
            ("engine={env: 4}", "unknown config key(s) engine.env; valid keys of engine: "
                                "clip, entropy_coef, envs, gamma"),
            ("engine={gamma: 1.5}", "engine.gamma must be in [0, 1]"),
            ("engine={envs: 0}", "engine.envs must be >= 1"),
            ("engine={envs: 1, steps: 1}", "engine.envs x engine.steps must be >= 2"),
            ("engine={clip: 0}", "engine.clip must be > 0"),
            ("engine=rl", "config.engine: expected a mapping, got 'rl'"),
            ("engine={envs: 4, steps: 16}", "data.batch_size must be in 1..32 (half a rollout "
                                            "of engine.envs x engine.steps = 4 x 16")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config(None, [*CARTPOLE, override])
    with pytest.raises(ConfigError, match=re.escape(  # (a search batch that fits the rollout)
            "retrain.batch_size must be in 1..32 (a rollout of engine.envs x engine.steps = "
            "2 x 16")):
        load_config(None, [*CARTPOLE, "engine={envs: 2, steps: 16}", "data.batch_size=16"])


def test_a_single_level_search_learns_on_the_whole_rollout():
    from diffnas.config import load_config

    rl = _rl()
    cfg = load_config(None, [*CARTPOLE, "data.batch_size=128",
                             "search.strategy={name: single_level}"])
    load_config(None, [*CARTPOLE, "data.batch_size=512", "search.strategy={name: single_level}"])

    task = rl.EncoderSearchTask(cfg, torch.device("cpu"))
    pairs = list(task.batches(0))
    assert len(pairs) == task.num_batches() == 8 and all(v is None for _, v in pairs)
    assert len(torch.unique(torch.cat([t["obs"] for t, _ in pairs[:4]]), dim=0)) == 512


def test_a_time_limit_is_bootstrapped_and_a_failure_is_not():
    """``collect``: the last reward of an episode cut by the step limit gets gamma V of its
    final observation, one that ended by failing gets nothing; the returns the value head
    learns are the GAE advantages plus the values, stopped at each episode's end."""
    rl = _rl()
    c = 3.0

    def act(obs):  # always push left (CartPole fails in about 9 steps); V = c everywhere
        logits = torch.tensor([[0.0, -1e9]]).expand(len(obs), 2)
        return logits, torch.full((len(obs),), c)

    envs = rl.Envs("CartPole-v1", 2, seed=0)
    envs.limit = 3  # a time limit before any failure
    r = rl.collect(envs, act, 5)
    rewards, done = torch.ones(5, 2), torch.zeros(5, 2)
    rewards[2] += rl.PPOSettings.gamma * c
    done[2] = 1.0
    values = torch.full((5, 2), c)
    want = rl.gae(rewards, values, done, torch.full((2,), c)) + values
    assert torch.allclose(r["returns"], want.flatten(), atol=1e-6)
    assert envs.episodes == 2

    envs = rl.Envs("CartPole-v1", 2, seed=0)
    r = rl.collect(envs, act, 20)
    ends = envs.episodes
    assert ends >= 2  # failures: each ending step's return is its reward alone, 1
    returns = r["returns"].reshape(20, 2)
    failed = [(t, e) for t in range(20) for e in range(2) if returns[t, e] == 1.0]
    assert len(failed) == ends
