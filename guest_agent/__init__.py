"""The apf-emu guest agent: plays the guest kernel of one vCPU (scheduler, #PF handler, page-ready interrupt)."""
