"""stable-baselines3's DDPG as rlrank trains it: AMC's learning rates, a reward baseline, and an
optional pessimistic actor over several critics.

**Pessimistic actor.** A search is a few hundred episodes with one noisy reward each. The actor
climbs the critic's gradient, so it is drawn to wherever the critic *over*-estimates the reward,
typically away from the strategies it was fitted on (measured on ResNet-20 CIFAR-10 in
``experiments/RESULTS.md``: after warm-up, AMC's DDPG played strategies averaging 0.71 while its
center strategy scored 0.77). With ``critics`` > 1 several critics are fitted to the same
transitions from different initializations, and the actor maximises the *smallest* of their values:
where they disagree (far from the data) the estimate is low, so the actor moves only where the
critics agree (the clipped double-Q idea of TD3 applied to the actor, as in ensemble methods for
offline RL). With one critic (AMC) the update is SB3's own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from stable_baselines3 import DDPG
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.common.utils import polyak_update, update_learning_rate


class BaselineReplayBuffer(ReplayBuffer):
    """SB3 replay buffer that subtracts a moving reward baseline from every sampled reward."""

    reward_offset: float = 0.0

    def _get_samples(self, batch_inds: np.ndarray, env: Any = None) -> ReplayBufferSamples:
        samples = super()._get_samples(batch_inds, env)
        return samples._replace(rewards=samples.rewards - self.reward_offset)


class AMCDDPG(DDPG):
    """SB3's DDPG with AMC's separate actor and critic learning rates; with several critics
    (``policy_kwargs={"n_critics": N}``) the actor maximises their minimum."""

    actor_lr: float = 1e-4
    critic_lr: float = 1e-3

    def _update_learning_rate(self, optimizers: Any) -> None:
        update_learning_rate(self.actor.optimizer, self.actor_lr)
        update_learning_rate(self.critic.optimizer, self.critic_lr)

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        """SB3's update (one critic), or with several critics the same update as DDPG configures
        TD3 (no target smoothing, no policy delay) with the actor maximising the critics' minimum."""
        if len(self.critic.q_networks) == 1:
            super().train(gradient_steps, batch_size)
            return
        self.policy.set_training_mode(True)
        self._update_learning_rate([self.actor.optimizer, self.critic.optimizer])
        actor_losses, critic_losses = [], []
        for _ in range(gradient_steps):
            self._n_updates += 1
            data = self.replay_buffer.sample(batch_size)  # type: ignore[union-attr]
            with torch.no_grad():
                next_actions = self.actor_target(data.next_observations)
                next_q = torch.cat(self.critic_target(data.next_observations, next_actions), dim=1)
                target = data.rewards + (1 - data.dones) * self.gamma * next_q.min(dim=1, keepdim=True).values
            critic_loss = sum(F.mse_loss(q, target) for q in self.critic(data.observations, data.actions))
            assert isinstance(critic_loss, torch.Tensor)
            critic_losses.append(critic_loss.item())
            self.critic.optimizer.zero_grad()
            critic_loss.backward()
            self.critic.optimizer.step()

            values = torch.cat(self.critic(data.observations, self.actor(data.observations)), dim=1)
            actor_loss = -values.min(dim=1).values.mean()
            actor_losses.append(actor_loss.item())
            self.actor.optimizer.zero_grad()
            actor_loss.backward()
            self.actor.optimizer.step()
            polyak_update(self.critic.parameters(), self.critic_target.parameters(), self.tau)
            polyak_update(self.actor.parameters(), self.actor_target.parameters(), self.tau)
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/actor_loss", np.mean(actor_losses))
        self.logger.record("train/critic_loss", np.mean(critic_losses))
