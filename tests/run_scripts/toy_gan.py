"""A two-optimizer GAN in the style of the classic DCGAN example, shrunk to multilayer perceptrons on
a 2-D mixture of Gaussians: a generator and a discriminator (sigmoid output, BCELoss), real and fake
labels, ``errD_real.backward()`` and ``errD_fake.backward()`` before ``optimizerD.step()``, then the
generator's step; Adam with beta1 = 0.5; the generator's weights saved every epoch with
``torch.save(netG.state_dict(), ...)``.

``--diverge``: the hand-written GAN loss many tutorials use, ``-(log D(x) + log(1 - D(G(z))))``,
with a learning rate far too high: the discriminator saturates, ``log(0)`` is -inf, the loss and the
gradients become non-finite.
"""

import argparse
import math

import torch
import torch.nn as nn
import torch.optim as optim


class Generator(nn.Module):
    def __init__(self, nz, ngf):
        super().__init__()
        self.main = nn.Sequential(
            nn.Linear(nz, ngf),
            nn.BatchNorm1d(ngf),
            nn.ReLU(True),
            nn.Linear(ngf, ngf),
            nn.BatchNorm1d(ngf),
            nn.ReLU(True),
            nn.Linear(ngf, 2),
        )

    def forward(self, input):
        return self.main(input)


class Discriminator(nn.Module):
    def __init__(self, ndf):
        super().__init__()
        self.main = nn.Sequential(
            nn.Linear(2, ndf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(ndf, ndf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(ndf, 1),
            nn.Sigmoid(),
        )

    def forward(self, input):
        return self.main(input).view(-1, 1).squeeze(1)


def weights_init(m):
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.2)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm1d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def sample_real(n, generator):
    centers = torch.tensor([[math.cos(2 * math.pi * k / 8), math.sin(2 * math.pi * k / 8)] for k in range(8)])
    idx = torch.randint(8, (n,), generator=generator)
    return 2 * centers[idx] + 0.05 * torch.randn(n, 2, generator=generator)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batchSize", type=int, default=64)
    parser.add_argument("--nz", type=int, default=8)
    parser.add_argument("--ngf", type=int, default=32)
    parser.add_argument("--ndf", type=int, default=32)
    parser.add_argument("--niter", type=int, default=3)
    parser.add_argument("--iters-per-epoch", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.0002)
    parser.add_argument("--beta1", type=float, default=0.5)
    parser.add_argument("--outf", default=".")
    parser.add_argument("--manualSeed", type=int, default=999)
    parser.add_argument("--diverge", action="store_true")
    opt = parser.parse_args()
    torch.manual_seed(opt.manualSeed)
    data_gen = torch.Generator().manual_seed(opt.manualSeed)
    netG = Generator(opt.nz, opt.ngf)
    netG.apply(weights_init)
    netD = Discriminator(opt.ndf)
    netD.apply(weights_init)
    criterion = nn.BCELoss()
    if opt.diverge:
        opt.lr = 0.5

        def criterion(output, label):
            return -(label * torch.log(output) + (1 - label) * torch.log(1 - output)).mean()

    fixed_noise = torch.randn(opt.batchSize, opt.nz)
    real_label, fake_label = 1.0, 0.0
    optimizerD = optim.Adam(netD.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999))
    optimizerG = optim.Adam(netG.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999))
    for epoch in range(opt.niter):
        for i in range(opt.iters_per_epoch):
            # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
            netD.zero_grad()
            real_cpu = sample_real(opt.batchSize, data_gen)
            batch_size = real_cpu.size(0)
            label = torch.full((batch_size,), real_label)
            output = netD(real_cpu)
            errD_real = criterion(output, label)
            errD_real.backward()
            D_x = output.mean().item()
            noise = torch.randn(batch_size, opt.nz)
            fake = netG(noise)
            label.fill_(fake_label)
            output = netD(fake.detach())
            errD_fake = criterion(output, label)
            errD_fake.backward()
            D_G_z1 = output.mean().item()
            errD = errD_real + errD_fake
            optimizerD.step()
            # (2) Update G network: maximize log(D(G(z)))
            netG.zero_grad()
            label.fill_(real_label)
            output = netD(fake)
            errG = criterion(output, label)
            errG.backward()
            D_G_z2 = output.mean().item()
            optimizerG.step()
            print(
                f"[{epoch}/{opt.niter}][{i}/{opt.iters_per_epoch}] Loss_D: {errD.item():.4f} "
                f"Loss_G: {errG.item():.4f} D(x): {D_x:.4f} D(G(z)): {D_G_z1:.4f} / {D_G_z2:.4f}"
            )
        with torch.no_grad():
            fake = netG(fixed_noise)
        print(f"epoch {epoch}: fake spread {fake.std().item():.4f}")
        torch.save(netG.state_dict(), f"{opt.outf}/netG_epoch_{epoch}.pth")
        torch.save(netD.state_dict(), f"{opt.outf}/netD_epoch_{epoch}.pth")


if __name__ == "__main__":
    main()
