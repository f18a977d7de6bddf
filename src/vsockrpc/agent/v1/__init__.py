"""Version 1 of the agent protocol: ``agent.proto`` and its generated stubs (checked in)."""
