"""The fault-injection suite (test_faults.py) reports how many faults it tried in pytest's summary."""
import pytest

FAULTS_KEY = pytest.StashKey[list]()


@pytest.fixture
def faults_tried(request) -> list:
    """Append one description per injected fault; the terminal summary prints the count."""
    return request.config.stash.setdefault(FAULTS_KEY, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tried = config.stash.get(FAULTS_KEY, [])
    if tried:
        kinds: dict = {}
        for fault in tried:
            kind = fault.split(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        terminalreporter.write_line(f"fault injection: {len(tried)} faults tried ("
                                    + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")")
