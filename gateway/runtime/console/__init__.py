"""The web console: pages, JSON API and live updates served by the gateway itself."""
