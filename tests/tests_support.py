"""Helpers shared by tests (not fixtures)."""
from pipelines.config import Config


def overrides_for(config: Config) -> list[str]:
    """Command-line overrides that reproduce a test config's work dir and data sizes."""
    s = config.data.synthetic
    return [f"paths.work_dir={config.paths.work_dir}", f"data.synthetic.n_train={s.n_train}",
            f"data.synthetic.n_val={s.n_val}", f"data.synthetic.n_test={s.n_test}"]
