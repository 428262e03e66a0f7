"""The route table built from the config: each public model name and the deployments that serve it."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import ModelNotFound
from gateway.settings import Deployment, Settings, Timeouts


@dataclass(slots=True, eq=False)
class DeploymentRuntime:
    """A deployment's settings plus what this process knows of its load."""

    config: Deployment
    model: str  # the public name it serves
    timeouts: Timeouts
    upstream_model: str
    outstanding: int = 0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def renames_model(self) -> bool:
        return self.upstream_model != self.model


@dataclass(frozen=True, slots=True)
class ModelRoute:
    name: str
    deployments: tuple[DeploymentRuntime, ...]
    created: int = field(default=0)


class RouteTable:
    def __init__(self, settings: Settings, *, created: int) -> None:
        self.models: dict[str, ModelRoute] = {}
        for name, model in settings.models.items():
            runtimes = tuple(
                DeploymentRuntime(
                    config=deployment,
                    model=name,
                    timeouts=settings.deployment_timeouts(deployment),
                    upstream_model=deployment.served_model or name,
                )
                for deployment in model.deployments
            )
            self.models[name] = ModelRoute(name=name, deployments=runtimes, created=created)

    def resolve(self, model: str) -> ModelRoute:
        route = self.models.get(model)
        if route is None:
            raise ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.", param="model")
        return route

    def deployments(self) -> list[DeploymentRuntime]:
        return [deployment for route in self.models.values() for deployment in route.deployments]
