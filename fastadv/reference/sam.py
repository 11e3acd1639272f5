"""Reference SAM / ASAM: the widely used optimizer of davda54/sam (the
"Sharpness-Aware Minimization" reference implementation), written from its
math.  Not a seed class; the oracle for ``fastadv.SAM``.

``first_step``: with ``norm = || [ ||(|w| if adaptive else 1) * g|| for every
parameter with a gradient ] ||`` (in the device of the first parameter),
for every parameter with a gradient: ``old_p = w.clone()``,
``e_w = (w^2 if adaptive else 1.0) * g * (rho / (norm + 1e-12)).to(w)``,
``w += e_w``.  ``second_step``: ``w.data = old_p`` for every parameter with a
gradient, then ``base_optimizer.step()``.  ``step(closure)``: first step
(zeroing the gradients), closure under ``enable_grad``, second step.
Host syncs: none; launches: several per parameter.
"""
import torch


class SAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        assert rho >= 0.0, f"Invalid rho, should be non-negative: {rho}"
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _with_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p

    @torch.no_grad()
    def _grad_norm(self):
        device = self.param_groups[0]["params"][0].device
        per_param = [((p.abs() if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(device)
                     for group, p in self._with_grad()]
        return torch.norm(torch.stack(per_param), p=2)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                factor = torch.pow(p, 2) if group["adaptive"] else 1.0
                p.add_(factor * p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for _, p in self._with_grad():
            p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is not None, "Sharpness Aware Minimization requires closure, but it was not provided"
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
