"""Device protocol adapters: one package per protocol, all behind ``adapters.base.Adapter``."""
