"""MooGRPOTrainer inside TRL's real GRPOTrainer: two training steps of a tiny random Llama on CPU.

Checks that the advantages the trainer trains on are moo_kernels' advantages of the rewards TRL computed
(not TRL's own), that the reward gates and objective weights from the config reach the op, and that the
model's weights move. No download: the model and the tokenizer are built here.
"""

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOTrainer

import moo_kernels as mk
from moo_kernels.integrations.trl import MooGRPOConfig, MooGRPOTrainer
from moo_kernels.ops.advantages.spec import OPTION_NAMES, AdvantageSpec

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "yes", "no"]
GROUP = 4


def make_tokenizer():
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def share_of_a(completions, **kwargs):
    return [sum(w == "a" for w in c.split()) / max(len(c.split()), 1) for c in completions]


def length(completions, **kwargs):
    return [len(c.split()) / 8.0 for c in completions]


def says_yes(completions, **kwargs):
    return [1.0 if "yes" in c.split() else 0.0 for c in completions]


def make_moe_model(tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        router_aux_loss_coef=0.02,
    )  # fmt: skip
    return MixtralForCausalLM(config)


def run_trainer(tmp_path, reward_funcs, return_trainer=False, model_factory=make_model, **moo):
    tokenizer = make_tokenizer()
    model = model_factory(tokenizer)
    if moo.get("beta", 0.0) != 0.0:  # TRL loads the reference model by name: give it a saved copy
        model.save_pretrained(tmp_path / "model")
        model = LlamaForCausalLM.from_pretrained(tmp_path / "model")
    dataset = Dataset.from_dict({"prompt": ["a b", "c d", "e f", "g h"] * 2})
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=GROUP,
        max_completion_length=8,
        max_steps=2,
        learning_rate=5e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    args = MooGRPOConfig(**{**options, **moo})
    trainer = MooGRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    generated, trained = [], []
    generate, compute_loss = trainer._generate_and_score_completions, trainer._compute_loss

    def capture_generate(inputs):
        out = generate(inputs)
        generated.append((trainer.last_moo_rewards.clone(), out["advantages"].clone()))
        return out

    def capture_loss(model, inputs):
        trained.append(inputs["advantages"].clone())
        trainer.last_inputs = inputs
        return compute_loss(model, inputs)

    trainer._generate_and_score_completions = capture_generate
    trainer._compute_loss = capture_loss
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.train()
    moved = max((p.detach() - before[k]).abs().max().item() for k, p in model.named_parameters())
    if return_trainer:
        return trainer
    return generated, trained, moved


def trl_default_advantages(rewards, weights):
    """TRL's sum_then_normalize with scale_rewards='group', to show the trainer did not use it."""
    r = (rewards * torch.tensor(weights)).sum(1).view(-1, GROUP)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()


def test_trl_two_objectives(tmp_path):
    weights = [1.0, 0.5]
    generated, trained, moved = run_trainer(
        tmp_path,
        [share_of_a, length],
        reward_weights=weights,
        moo_weighting="variance",
        moo_std_floor=[0.05],
        moo_negative_scale=0.5,
    )
    assert len(generated) == 2 and len(trained) == 2
    for (rewards, used), in_loss in zip(generated, trained, strict=True):
        assert rewards.shape == (8, 2)
        expected = mk.multi_objective_advantages(
            rewards,
            group_size=GROUP,
            weights=weights,
            weighting="variance",
            std_floor=0.05,
            negative_scale=0.5,
            nan_policy="ignore",
        ).advantages
        torch.testing.assert_close(used, expected)
        # The loss saw the same advantages (TRL shuffles the generation batch before splitting it).
        torch.testing.assert_close(in_loss.sort().values, expected.sort().values)
        if expected.abs().sum() > 0:
            assert not torch.allclose(used, trl_default_advantages(rewards, weights), atol=1e-3)
    assert moved > 0, "the model's weights did not move"


@pytest.mark.parametrize("moo_policy_loss", [True, False])
def test_trl_gate_and_conditional_reward(tmp_path, moo_policy_loss):
    # says_yes is a feasibility gate (not an objective); length only counts for completions that say "yes".
    generated, trained, moved = run_trainer(
        tmp_path,
        [share_of_a, length, says_yes],
        moo_gate_funcs=["says_yes"],
        moo_reward_gates={"length": "says_yes"},
        moo_gated_value=-1.0,
        moo_infeasible_advantage=-0.25,
        moo_policy_loss=moo_policy_loss,
        max_steps=1,
    )
    rewards, used = generated[0]
    passes = rewards[:, 2] > 0.5
    expected = mk.multi_objective_advantages(
        rewards[:, :2],
        group_size=GROUP,
        weighting="fixed",  # the default of the op and of the config
        gates=passes,
        reward_gates=torch.stack([torch.ones_like(passes), passes], dim=1),
        gated_value=-1.0,
        infeasible_advantage=-0.25,
        nan_policy="ignore",
    ).advantages
    torch.testing.assert_close(used, expected)
    torch.testing.assert_close(trained[0].sort().values, expected.sort().values)
    assert moved > 0


def test_trl_config_has_every_advantage_option(tmp_path):
    # Every option of the op is a moo_ field with the op's default (nan_policy: "ignore", TRL's None rewards).
    config = MooGRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    defaults = AdvantageSpec.defaults()
    assert config.moo_weighting == "fixed"
    for name in OPTION_NAMES:
        expected = "ignore" if name == "nan_policy" else defaults[name]
        assert getattr(config, f"moo_{name}") == expected, name


@pytest.mark.parametrize(
    "trl,moo,op",
    [
        (dict(scale_rewards="batch"), dict(moo_weighting="scalarize"), dict(weighting="scalarize", scale="batch",
                                                                             lengths=True)),
        (dict(scale_rewards="none"), {}, dict(scale="none")),
        (dict(multi_objective_aggregation="normalize_then_sum"), {}, dict(batch_normalize=True, lengths=True)),
        ({}, dict(moo_estimator="opo"), dict(estimator="opo", lengths=True)),
        ({}, dict(moo_estimator="grpo_passk"), dict(estimator="grpo_passk")),
    ],
)  # fmt: skip
def test_trl_maps_scale_rewards_and_estimators(tmp_path, trl, moo, op):
    """TRL's scale_rewards / multi_objective_aggregation and the estimators reach the op; the completion lengths
    too where the options read them."""
    trainer = run_trainer(tmp_path, [share_of_a, length], return_trainer=True, max_steps=1, **trl, **moo)
    rewards, result, lengths = trainer.last_moo_rewards, trainer.last_moo_result, trainer.last_moo_lengths
    op = dict(op)
    if op.pop("lengths", False):
        # one process: the whole batch's completion lengths (the loss's batch is the same, shuffled)
        mask = trainer.last_inputs["completion_mask"]
        assert torch.equal(lengths.sort().values, mask.sum(dim=1).sort().values)
        op["lengths"] = lengths
    else:
        assert lengths is None
    expected = mk.multi_objective_advantages(rewards, group_size=GROUP, nan_policy="ignore", **op)
    torch.testing.assert_close(result.advantages, expected.advantages)


def test_trl_config_refuses_contradictions(tmp_path):
    common = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="moo_weighting='scalarize'"):
        MooGRPOConfig(**common, scale_rewards="batch")
    with pytest.raises(ValueError, match="not both"):
        MooGRPOConfig(**common, moo_estimator="rloo", moo_normalize="center")
    with pytest.raises(ValueError, match="divides the z-score"):
        MooGRPOConfig(**common, moo_estimator="rloo", scale_rewards="none")
    with pytest.raises(ValueError, match="normalize_then_sum"):
        MooGRPOConfig(**common, multi_objective_aggregation="normalize_then_sum", moo_weighting="variance")


def test_trl_config_rejects_unknown_options(tmp_path):
    with pytest.raises(ValueError, match="moo_weighting"):
        MooGRPOConfig(output_dir=str(tmp_path), moo_weighting="softmax", report_to="none", use_cpu=True)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "sapo", "vespo", "luspo"])
def test_trl_moo_loss_matches_trl_loss(tmp_path, loss_type):
    # On the same batch (same advantages), moo_kernels.policy_loss gives TRL's own loss and gradient.
    trainer = run_trainer(
        tmp_path, [share_of_a, length], return_trainer=True, loss_type=loss_type, epsilon_high=0.28, max_steps=1
    )
    check_same_loss(trainer)


def test_trl_off_policy_mask_matches_trl_loss(tmp_path):
    """off_policy_mask_threshold (refused before 0.4.0) reaches the loss; TRL's own loss on the same batch."""
    trainer = run_trainer(tmp_path, [share_of_a, length], return_trainer=True, loss_type="dapo",
                          off_policy_mask_threshold=0.01, max_steps=1, num_iterations=2)  # fmt: skip
    check_same_loss(trainer)


def test_trl_bias_corrected_kl_matches_trl_loss(tmp_path):
    """beta > 0 with use_bias_correction_kl (refused before 0.4.0): the k3 term times the importance ratio."""
    trainer = run_trainer(tmp_path, [share_of_a, length], return_trainer=True, loss_type="dapo", beta=0.1,
                          use_bias_correction_kl=True, max_steps=1, num_iterations=2)  # fmt: skip
    assert "ref_per_token_logps" in trainer.last_inputs and "old_per_token_logps" in trainer.last_inputs
    check_same_loss(trainer)
    with pytest.raises(ValueError, match="importance_sampling_level='sequence'"):
        run_trainer(tmp_path, [share_of_a, length], loss_type="grpo", beta=0.1, use_bias_correction_kl=True,
                    importance_sampling_level="sequence", max_steps=1)  # fmt: skip


def check_same_loss(trainer):
    model, inputs = trainer.model, trainer.last_inputs
    model.train()
    losses, grads = [], []
    state = {k: getattr(trainer, k) for k in ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")}
    for cls in (MooGRPOTrainer, GRPOTrainer):
        for k, v in state.items():  # TRL's adaptive entropy controller: both losses start from the same state
            setattr(trainer, k, v)
        model.zero_grad()
        loss = cls._compute_loss(trainer, model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().max() > 0


def test_trl_luspo_sequence_level_and_vespo_options_match_trl_loss(tmp_path):
    """luspo with TRL's recommended sequence-level ratio (mode gspo), vespo with its own k / lambda, both off-policy
    (num_iterations=2: old log-probs differ from the current ones after the first step)."""
    trainer = run_trainer(tmp_path, [share_of_a, length], return_trainer=True, loss_type="luspo",
                          importance_sampling_level="sequence", max_steps=2, num_iterations=2)  # fmt: skip
    assert trainer._moo_mode == "gspo"
    check_same_loss(trainer)
    trainer = run_trainer(tmp_path, [share_of_a, length], return_trainer=True, loss_type="vespo", vespo_k_pos=1.0,
                          vespo_lambda_pos=0.5, vespo_k_neg=4.0, max_steps=2, num_iterations=2)  # fmt: skip
    assert trainer._moo_mode == "vespo"
    check_same_loss(trainer)


@pytest.mark.parametrize(
    "options",
    [
        dict(top_entropy_quantile=0.5),
        dict(entropy_coef=0.05),
        dict(top_entropy_quantile=0.3, entropy_coef=-0.1, loss_type="grpo", beta=0.1),
        dict(use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=10.0, gradient_accumulation_steps=2),
    ],
)
def test_trl_entropy_terms_match_trl_loss(tmp_path, options):
    """top_entropy_quantile, the entropy bonus and TRL's adaptive coefficient (refused before 0.5.0): TRL's own loss
    and gradient on the same batch, from the same controller state."""
    options = {"loss_type": "dapo", "max_steps": 1, **options}
    trainer = run_trainer(tmp_path, [share_of_a, length], return_trainer=True, **options)
    check_same_loss(trainer)
    if options.get("use_adaptive_entropy"):  # the controller moved as TRL's does (entropy below the target: up)
        assert trainer.entropy_coef > 0.05 and trainer._last_world_entropy < 10.0


def test_trl_moe_aux_loss_matches_trl_loss(tmp_path):
    """The router's aux loss (refused before 0.5.0) is added as TRL adds it."""
    trainer = run_trainer(tmp_path, [share_of_a, length], return_trainer=True, model_factory=make_moe_model,
                          loss_type="dapo", max_steps=1)  # fmt: skip
    assert trainer.aux_loss_enabled
    check_same_loss(trainer)


@pytest.mark.parametrize("is_mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_trl_vllm_importance_sampling_by_rollout_correction(tmp_path, is_mode):
    """The trainer's vLLM importance-sampling ratio (rollout_correction) is TRL's formula for each mode, in TRL's
    shapes; a NaN sampler log-prob gives ratio 1, as in TRL."""
    trainer = run_trainer(tmp_path, [share_of_a], return_trainer=True, max_steps=1)
    trainer.vllm_importance_sampling_mode = is_mode
    trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = 0.7, 1.3
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g) * 2
    sampling = old + 0.3 * torch.randn(4, 6, generator=g)
    sampling[0, 1] = float("nan")
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[2, 3:] = 0
    ratio = trainer.moo_importance_sampling_ratio(
        {"completion_mask": mask, "old_per_token_logps": old, "sampling_per_token_logps": sampling}
    )
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)  # TRL's formula
    if is_mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    expected = torch.exp(diff)
    if is_mode.endswith("truncate"):
        expected = expected.clamp(0.7, 1.3)
    else:
        expected = expected.masked_fill((expected < 0.7) | (expected > 1.3), 0.0)
    assert ratio.shape == expected.shape
    keep = mask.bool() if ratio.shape[1] > 1 else torch.ones_like(ratio, dtype=torch.bool)
    torch.testing.assert_close(ratio[keep], expected[keep], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type="dapo", beta=0.1, num_iterations=2),
        dict(loss_type="grpo", top_entropy_quantile=0.5, entropy_coef=0.05, epsilon_high=0.28),
        dict(loss_type="luspo", importance_sampling_level="sequence", num_iterations=2),
    ],
)
def test_trl_fused_linear_matches_trl_loss(tmp_path, options):
    """moo_fused_linear: the loss from the backbone's hidden states and the lm_head (policy_loss_from_hidden), the
    old / reference log-probs by token_logprobs_from_hidden; TRL's own loss (its fused log-prob head) and gradients on
    the same batch."""
    trainer = run_trainer(tmp_path, [share_of_a, length], return_trainer=True, moo_fused_linear=True, max_steps=2,
                          **options)  # fmt: skip
    inputs = trainer.last_inputs
    if options.get("num_iterations", 1) > 1:  # the old log-probs came from token_logprobs_from_hidden
        assert "old_per_token_logps" in inputs
    calls = []
    original = mk.policy_loss_from_hidden

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    mk.policy_loss_from_hidden = spy
    try:
        check_same_loss(trainer)
    finally:
        mk.policy_loss_from_hidden = original
    assert calls  # the fused path ran


def test_trl_fused_linear_moe_aux_loss_matches_trl_loss(tmp_path):
    """moo_fused_linear with the router's aux loss (refused before): the loss from the hidden states plus the aux
    loss the model computes, TRL's loss and gradients on the same batch; the log-probs' sweep with the aux loss:
    the same log-probs as without it, TRL's aux loss (TRL's log-probs to the bf16 rounding of its autocast head)."""
    trainer = run_trainer(tmp_path, [share_of_a, length], return_trainer=True, model_factory=make_moe_model,
                          moo_fused_linear=True, loss_type="dapo", max_steps=1)  # fmt: skip
    assert trainer.aux_loss_enabled
    check_same_loss(trainer)
    inputs = trainer.last_inputs
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    n = inputs["completion_ids"].size(1)
    with torch.no_grad():
        got = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, n, batch_size=2,
                                                        compute_aux_loss=True)  # fmt: skip
        plain = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, n, batch_size=2)
        want = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, att, n, batch_size=2,
                                                              compute_aux_loss=True)  # fmt: skip
    mask = inputs["completion_mask"].bool()
    assert torch.equal(got[0], plain[0]) and plain[2] is None
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[0][mask], want[0][mask], atol=1e-2, rtol=0)
