"""`tokenmill serve` with an injected engine fault: any step that includes a request seeded
666 raises, as a kernel bug triggered by one request's input would. Used by test_server.py to
check that such a request fails alone and the server keeps serving the others."""

import sys

from tokenmill.engine.model_runner import ModelRunner

POISON_SEED = 666
_execute = ModelRunner.execute


def _faulty_execute(self, sched):
    if any(s.seq.params.seed == POISON_SEED for s in sched.scheduled):
        raise RuntimeError("injected fault")
    return _execute(self, sched)


ModelRunner.execute = _faulty_execute

if __name__ == "__main__":
    from tokenmill.cli import main

    sys.exit(main(sys.argv[1:]))
