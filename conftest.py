"""pytest reads its hooks from this file only: the summary line names the devices the tests ran on."""


def pytest_terminal_summary(terminalreporter):
    import test_kd
    missing = [d for d in ("cuda", "mps") if d not in test_kd.DEVICES]
    terminalreporter.write_line(f"devices tested: {', '.join(test_kd.DEVICES)}"
                                + (f" ({', '.join(missing)}: not on this machine)" if missing else ""))
