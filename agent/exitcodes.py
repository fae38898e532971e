"""Process exit codes, from BSD sysexits(3), so scripts and systemd can act on them."""

OK = 0
FAILURE = 1  # unexpected internal error
USAGE = 2  # bad command-line usage (argparse's own code)
DATAERR = 65  # input data was bad: a model directory, an inference input
NOINPUT = 66  # an input file does not exist
UNAVAILABLE = 69  # the agent (or a model) is not reachable or not ready
SOFTWARE = 70  # a model failed while running
OSERR = 71  # cannot bind the listen address and the like
CANTCREAT = 73  # the state directory cannot be created or written
TEMPFAIL = 75  # try again later
NOPERM = 77  # the agent refused the request: no or wrong API token, cross-origin, untrusted registry
CONFIG = 78  # configuration error: systemd's RestartPreventExitStatus uses it
