"""socknet controller: os-ken apps, flow encoding and reconciliation."""

import warnings

# python-ovs imports eventlet when it is installed (os-ken pulls it in) and eventlet
# warns about itself on import, a banner on stderr that no operator can act on: socknet
# runs os-ken on native threads. Here, so that every entry point (the CLI, the labs, the
# benchmarks) importing anything of controller/ is covered.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
