"""Compile units, one per config section, in the spirit of Telegraf's ``Check``/``Process``.

Each unit reads its section of the validated :class:`~gateway.config.models.Config` through a
:class:`~gateway.config.units.context.Unit`, reports every problem there (file, line, path)
and returns that section's plan. :func:`gateway.config.compiler.compile_config` runs them in
order and assembles the :class:`~gateway.config.plans.GatewayPlan`.
"""
