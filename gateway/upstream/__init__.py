"""The one place requests leave the gateway: pooled HTTP sessions per deployment, and error translation."""
