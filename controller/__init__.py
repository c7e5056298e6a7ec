"""socknet controller: os-ken apps, flow encoding and reconciliation."""
