"""GRPO with expert parallelism across data-parallel ranks: EP=2 over DP=2 (each DP rank its own prompts) equals the
same two DP ranks without EP. The in-engine generator replicates tokens over the expert group, so every rank must run
every DP rank's requests; without that the ranks' different batches meet in the experts' all-reduce."""
import pytest

from tests.distributed import run_distributed
from tests.rl.layouts import assert_same_step, logged, one_step, save_init

pytestmark = pytest.mark.slow


def test_one_rl_step_at_ep2_equals_ep1_over_two_dp_ranks(tmp_path):
    """The reference: the same two DP ranks without EP (each rank's experts whole, nothing to replicate)."""
    run_distributed(save_init, 1, str(tmp_path))
    ref = logged(run_distributed(one_step, 2, str(tmp_path), "ep1", []))
    assert_same_step(ref, logged(run_distributed(one_step, 2, str(tmp_path), "ep2",
                                                 ["parallel.expert_model_parallel_size=2"])))
